"""A small local web page (FastAPI) for polar maps and aortography frames."""
