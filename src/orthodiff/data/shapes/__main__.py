import sys

from orthodiff.data.shapes.cli import main

sys.exit(main())
