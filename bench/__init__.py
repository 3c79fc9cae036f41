"""`make bench`: our gateway against Orthanc, side by side in one run (see __main__.py)."""
