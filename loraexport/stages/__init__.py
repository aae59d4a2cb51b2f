"""The stages over directories, each usable alone: ``inputs`` (load and check once), ``merge``,
``export``, ``verify``, ``train``, ``inspect``. ``loraexport.pipeline`` chains them."""
