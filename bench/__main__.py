"""``python -m bench``: see :mod:`bench.run`; ``python -m bench soak ...``: see :mod:`bench.soak`."""

import sys

if sys.argv[1:2] == ["soak"]:
    from bench.soak import main as soak_main

    sys.exit(soak_main(sys.argv[2:]))

from bench.run import main

sys.exit(main())
