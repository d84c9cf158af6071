from tickscale.cli import app

app()
