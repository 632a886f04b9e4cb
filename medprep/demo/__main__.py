"""``python -m medprep.demo [FOLDER]``: build the demo dataset (see ``medprep.demo``)."""

import sys

from medprep.demo import main

sys.exit(main())
