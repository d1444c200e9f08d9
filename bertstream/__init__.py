"""What every part of bertstream shares and nothing else: the settings that cross
processes (``bertstream.config``) and a command's logging (``bertstream.logs``).
Beam-free and TensorFlow-free, so the ingester and the operator tools import it."""
