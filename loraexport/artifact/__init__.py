"""What an output folder is: ``loraexport.json`` (``schema`` reads it, ``provenance`` writes it,
``manifest`` hashes every file), and ``output`` (planned, written to a temporary folder, swapped in)."""
