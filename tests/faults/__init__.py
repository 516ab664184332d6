"""Fault injection: clients race for one lock while faults strike, and a checker judges
the recorded history (in the spirit of Jepsen). See README.md in this folder."""
