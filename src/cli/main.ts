// The `blobcache` command: argv -> one AbortController -> library call -> exit code.
// Started by bin.ts (dist/cli.js) or, from a startup snapshot, by snapshot.ts.
import { Command, CommanderError } from 'commander'
import pkg from '../../package.json' with { type: 'json' }
import { addCacheCommand } from './commands/cache.js'
import { addCopyCommand } from './commands/copy.js'
import { addImageCacheCommand } from './commands/image-cache.js'
import { addInspectCommand } from './commands/inspect.js'
import { type CliIO, type RunContext, describeError, processIO } from './io.js'
import { stopIdleThreads } from '../io/script-worker.js'

export type { CliIO } from './io.js'

/** Exit code of a run that was interrupted twice (128 + SIGINT). */
const EXIT_INTERRUPTED = 130

/** The subcommands, each added by its own function. */
const COMMANDS: Record<string, (program: Command, ctx: RunContext) => void> = {
  copy: addCopyCommand,
  inspect: addInspectCommand,
  cache: addCacheCommand,
  'image-cache': addImageCacheCommand,
}

/**
 * Builds the command tree for one run; every command reports through `ctx`. With `only` (the
 * subcommand a command line names) just that subcommand is built: a short command does not pay
 * for the options of all the others (about 2 ms).
 */
export function createProgram(ctx: RunContext, only?: string): Command {
  const { io } = ctx
  const program = new Command('blobcache')
    .description('Copy container images between transports, keeping a content-addressed cache of their blobs.')
    .version(pkg.version, '-v, --version')
    .exitOverride()
    .configureOutput({
      writeOut: (s) => void io.stdout.write(s),
      writeErr: (s) => void io.stderr.write(s),
      outputError: (s, write) => write(s),
    })
    .addHelpText(
      'after',
      '\nImage names are transport:reference, as in skopeo: dir:/path, oci:/path[:tag],\n' +
        'oci-archive:/file.tar[:tag], docker-archive:/file.tar[:name:tag].',
    )
  // Subcommands made with .command() inherit exitOverride and the output configuration.
  const add = only !== undefined && Object.hasOwn(COMMANDS, only) ? [COMMANDS[only]] : Object.values(COMMANDS)
  for (const f of add) f(program, ctx)
  return program
}

/**
 * Runs the CLI with `argv` (without node and script) and resolves its exit code: 0 on
 * success, 1 on failure (one line on stderr naming the image and the cause), 2 on a usage
 * error (commander's message on stderr). It MUST NOT exit the process itself: the only exit is
 * a second Ctrl-C, which leaves at once with 130. The first Ctrl-C aborts the run's signal.
 */
export async function main(argv: string[], io: CliIO = processIO()): Promise<number> {
  const controller = new AbortController()
  let interrupted = false
  const onSigint = () => {
    if (interrupted) process.exit(EXIT_INTERRUPTED)
    interrupted = true
    io.stderr.write('blobcache: interrupted, cleaning up (press Ctrl-C again to quit at once)\n')
    const reason = new Error('interrupted')
    reason.name = 'AbortError'
    controller.abort(reason)
  }
  process.on('SIGINT', onSigint)
  const ctx: RunContext = { io, signal: controller.signal, exitCode: 0 }
  try {
    await createProgram(ctx, argv[0]).parseAsync(argv, { from: 'user' })
    return ctx.exitCode
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2
    io.stderr.write(`blobcache: ${describeError(err)}\n`)
    return 1
  } finally {
    process.removeListener('SIGINT', onSigint)
  }
}

/** Runs {@link main} as the process: its exit code becomes the process's. */
export function runProcess(argv: string[]): void {
  main(argv).then(
    (code) => {
      process.exitCode = code
      // the worker threads end now, in parallel, instead of one by one at exit
      void stopIdleThreads()
    },
    (err: unknown) => {
      process.stderr.write(`blobcache: ${describeError(err)}\n`)
      process.exitCode = 1
    },
  )
}
