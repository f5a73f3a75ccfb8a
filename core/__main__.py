from lowmem.cli import main

main()
