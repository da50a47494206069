from camjobs.cli import app

app(prog_name="camjobs")
