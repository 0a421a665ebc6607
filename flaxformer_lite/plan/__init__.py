"""Planning for TPUs from a machine without one: `flaxformer-lite plan`.

topology.py names slices and gets compile-only devices from libtpu; planner.py compiles a
run's train step for them and reports memory, FLOPs, estimates and collectives. The room
sits above train/ and inference/, whose programs it compiles.
"""
