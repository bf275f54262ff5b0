"""``python -m autowu.launcher``: the launcher (``autowu/launcher/train.py``), as ``launch/train.py`` runs it."""
from autowu.launcher.console import quiet_third_party

quiet_third_party()  # before DeepSpeed is imported: its import already logs (``--verbose`` keeps it all)

from autowu.launcher.train import cli  # noqa: E402

cli()
