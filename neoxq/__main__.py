from neoxq.cli import main

main()
