"""One grading spec per lab: ``labNN.py`` defines ``SPEC`` (see ``utils.labs.spec``)."""
