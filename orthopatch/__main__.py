from orthopatch.cli import main

main()
