"""Adversarial tests written for the wave 2 hardening issue, not yet collected.

``test_stateful.py`` (hypothesis state machine over scope operations) and ``test_faults.py``
(a TCP proxy that cuts or stalls connections) pass against the new lifecycle, but one fault
test was seen to fail once in two runs and needs a look before CI collects them; they also
need ``hypothesis`` in the ``test`` extra. tests/conftest.py lists this folder in
``collect_ignore``.
"""
