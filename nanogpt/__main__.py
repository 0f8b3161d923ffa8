from nanogpt.cli import main

main()
