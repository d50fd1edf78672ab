"""The demo session app `sessionpool up` runs (and the echo test image copies): `echo.py`."""
