"""``python -m bench``: see :mod:`bench.run`; ``python -m bench soak ...``: see :mod:`bench.soak`;
``python -m bench soak-lb ...``: see :mod:`bench.soak_lb`."""

import sys

if sys.argv[1:2] == ["soak"]:
    from bench.soak import main as soak_main

    sys.exit(soak_main(sys.argv[2:]))

if sys.argv[1:2] == ["soak-lb"]:
    from bench.soak_lb import main as soak_lb_main

    sys.exit(soak_lb_main(sys.argv[2:]))

from bench.run import main

sys.exit(main())
