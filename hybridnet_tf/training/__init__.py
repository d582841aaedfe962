"""Where training happens: the fit loop, its callbacks and schedules."""
