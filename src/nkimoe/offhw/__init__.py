"""Off-hardware runs of the contest path through the real NxDI and NxD sources on CPU.

``standins`` holds the import-time stand-ins for the closed Neuron packages, ``environment`` puts
one SDK release's vendored NxD and NxDI sources on ``sys.path`` (inside an interpreter with
torch 2.9 and torch-xla 2.9, the ``[nxdi]`` extra), ``checks`` drives the contest harness there
and ``runner`` launches it from any interpreter.
"""
