"""Reading SimpleTuner-format config files into validated, typed models."""
