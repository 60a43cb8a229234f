"""Files: the trained-optimizer format and atomic, validated reads and writes (``checkpoint``)."""
