import sys

from curator_assets.cli.commands import main

sys.exit(main())
