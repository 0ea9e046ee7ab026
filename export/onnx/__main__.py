import sys

from lowra.export.onnx.cli import main

sys.exit(main())
