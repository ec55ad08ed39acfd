// The entry of dist/cli.js (tsup adds the shebang): runs the CLI with the process's arguments.
// bin/blobcache starts the same CLI from a startup snapshot when one was built for this Node.js.
import { runProcess } from './main.js'

runProcess(process.argv.slice(2))
