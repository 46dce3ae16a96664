from pfbdiff.apps.cli import main

main()
