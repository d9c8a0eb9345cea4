"""Which build of the application this is; the API reports it at ``/``."""

RELEASE = "reference-1"
