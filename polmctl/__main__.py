from polmctl.cli import main

main()
