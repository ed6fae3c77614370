"""Local web GUI over the whole workflow: models, measurement, strategy editing, convert and verify."""
