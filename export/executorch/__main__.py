import sys

from lowra.export.executorch.exporter import main

sys.exit(main())
