"""The lowest floor: enums, dtypes, reading files (bounded, untrusted), memory, progress.

Imports nothing else of loraexport but ``loraexport.errors``."""
