"""The top layer of the scripts: their command-line flags (with the methods' and the data's
declared options, config files) and the complete list of ``--distill`` methods."""
