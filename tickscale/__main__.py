from tickscale.cli import app

# The command's own name in its usage and error lines, not "python -m tickscale".
app(prog_name="tickscale")
