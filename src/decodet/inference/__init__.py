"""What the runtimes, the exporters, prediction and evaluation share: the deployable graph
(``graph.DeployModel``), how images become its inputs (``inputs``), the exported metadata
(``metadata``), calibration images (``calibration``), video files (``video``), drawing
(``draw``) and the name scopes that keep module paths in exported node names (``scopes``)."""
