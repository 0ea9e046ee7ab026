import sys

from lowra.export.onnx.exporter import main

sys.exit(main())
