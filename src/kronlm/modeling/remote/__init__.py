"""Templates of the standalone modeling code kronlm writes into compressed model folders.

``kronlm_layers.py`` is copied verbatim into every folder (see :mod:`kronlm.modeling.remote_code`);
it imports only torch, never kronlm. kronlm reads the file's text; nothing in kronlm imports it at
run time (the tests do, to check it against kronlm's own layers).
"""
