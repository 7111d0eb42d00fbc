"""raysemi: semi-supervised semantic segmentation at scale."""

import os

# torch's OpenMP threads spin between parallel regions by default (libgomp's OMP_WAIT_POLICY unset). When another
# process holds one of the cores (a second run, Ray's own processes, a laptop's desktop), every region then waits
# for a preempted spinner: a 2-thread step of lraspp_mobilenet_v3 took 4.06 s beside two 1-thread runs, and 0.385 s
# with passive waiting (BENCHMARKS.md section 3). libgomp reads the variable once, when torch loads it, so it is
# set here, before anything in raysemi imports torch, and inherited by the processes a local Ray starts; a value
# the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
