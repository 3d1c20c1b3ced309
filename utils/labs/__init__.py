"""The lab system: one-source labs, learner self-checks and the sandboxed batch autograder.

- ``spec``        what a lab's grading spec is made of (``LabSpec``, ``Exercise``, ``Case``) and
                  the comparators; ``specs/labNN.py`` holds one spec per lab
- ``check``       the learner's self-check cell: ``from utils.labs.check import check``
- ``generate``    ``python -m utils.labs generate [--check]``: labs/ from the masters in solutions/
- ``grade``       ``python -m utils.labs grade LAB FILES ...``: the batch autograder
- ``sandbox``     the bubblewrap sandbox each submission runs in (parent side); ``sandbox_child``
                  its child side
- ``gradescope``  ``python -m utils.labs gradescope LAB --out DIR``: the lab as a Gradescope
                  autograder bundle

Import rule: the lab system imports the course's core modules only; the lab specs are the one
bridge to chapter modules (they name the reference implementation each answer must not call).
"""
