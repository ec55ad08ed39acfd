import type { Command } from 'commander'
import { CacheDirectory, type CacheEntry } from '../../blobcache/directory.js'
import { type Digest, isDigest } from '../../digest.js'
import { type RunContext, attempt, formatBytes, parseDuration, parseSize, printJSON, println } from '../io.js'

interface JsonFlag {
  json?: boolean
}

interface PruneFlags extends JsonFlag {
  maxSize?: number
  olderThan?: number
}

/** Adds `blobcache cache ls|has|verify|prune|clear DIR …` to the program. */
export function addCacheCommand(program: Command, ctx: RunContext): void {
  const cache = program
    .command('cache')
    .description('look after a blob cache directory (the one given to copy --blob-cache)')

  cache
    .command('ls')
    .description('list the entries of the cache: blobs, configs, notes and leftovers')
    .argument('<dir>', 'cache directory')
    .option('--json', 'print the entries as JSON')
    .action(async (dir: string, flags: JsonFlag) => {
      await attempt(ctx, `listing cache ${dir}`, async () => {
        const entries = await new CacheDirectory(dir).list()
        if (flags.json) printJSON(ctx.io, entries.map(entryJSON))
        else printEntries(ctx, entries)
      })
    })

  cache
    .command('has')
    .description('tell whether the cache holds each digest; exits 1 if any is missing')
    .argument('<dir>', 'cache directory')
    .argument('<digest...>', 'digests to look up, sha256:<hex>')
    .option('--json', 'print the answers as JSON')
    .action(async (dir: string, digests: string[], flags: JsonFlag, cmd: Command) => {
      const bad = digests.find((d) => !isDigest(d))
      if (bad !== undefined) cmd.error(`error: invalid digest ${JSON.stringify(bad)}`, { exitCode: 2, code: 'blobcache.usage' })
      await attempt(ctx, `looking up blobs in cache ${dir}`, async () => {
        const store = new CacheDirectory(dir)
        const answers: { digest: string; present: boolean; size?: number }[] = []
        for (const digest of digests as Digest[]) {
          ctx.signal.throwIfAborted()
          const found = await store.find(digest)
          answers.push(found ? { digest, present: true, size: found.size } : { digest, present: false })
        }
        if (flags.json) printJSON(ctx.io, answers)
        else for (const a of answers) println(ctx.io, a.present ? `${a.digest} present ${a.size}` : `${a.digest} missing`)
        if (answers.some((a) => !a.present)) ctx.exitCode = 1
      })
    })

  cache
    .command('verify')
    .description('hash every blob and remove those that do not match their names')
    .argument('<dir>', 'cache directory')
    .option('--json', 'print the report as JSON')
    .action(async (dir: string, flags: JsonFlag) => {
      await attempt(ctx, `verifying cache ${dir}`, async () => {
        const report = await new CacheDirectory(dir).verify({ signal: ctx.signal })
        if (flags.json) return printJSON(ctx.io, report)
        for (const name of report.removed) println(ctx.io, `removed ${name}`)
        println(ctx.io, `checked ${report.checked} blobs (${formatBytes(report.bytesChecked)}), removed ${report.removed.length}`)
      })
    })

  cache
    .command('prune')
    .description('remove entries older than a duration and/or the oldest until the cache fits a size')
    .argument('<dir>', 'cache directory')
    .option('--max-size <size>', 'keep at most this many bytes, removing least recently used first (e.g. 1G, 500M)', parseSize)
    .option('--older-than <duration>', 'remove entries not used for this long (e.g. 7d, 12h, 1h30m)', parseDuration)
    .option('--json', 'print the report as JSON')
    .action(async (dir: string, flags: PruneFlags) => {
      await attempt(ctx, `pruning cache ${dir}`, async () => {
        const report = await new CacheDirectory(dir).prune({
          signal: ctx.signal,
          ...(flags.maxSize !== undefined ? { maxBytes: flags.maxSize } : {}),
          ...(flags.olderThan !== undefined ? { olderThan: flags.olderThan } : {}),
        })
        if (flags.json) return printJSON(ctx.io, report)
        for (const name of report.removed) println(ctx.io, `removed ${name}`)
        println(
          ctx.io,
          `removed ${report.removed.length} entries, freed ${formatBytes(report.freedBytes)}, kept ${formatBytes(report.keptBytes)}`,
        )
      })
    })

  cache
    .command('clear')
    .description('remove everything in the cache directory')
    .argument('<dir>', 'cache directory')
    .option('--json', 'print the result as JSON')
    .action(async (dir: string, flags: JsonFlag) => {
      await attempt(ctx, `clearing cache ${dir}`, async () => {
        await new CacheDirectory(dir).clear()
        if (flags.json) printJSON(ctx.io, { cleared: dir })
        else println(ctx.io, `cleared ${dir}`)
      })
    })
}

function entryJSON(e: CacheEntry) {
  return { name: e.name, kind: e.kind, digest: e.digest ?? null, size: e.size, mtime: e.mtime.toISOString() }
}

function printEntries(ctx: RunContext, entries: CacheEntry[]): void {
  let total = 0
  for (const e of entries) {
    total += e.size
    const when = e.mtime.toISOString().slice(0, 19).replace('T', ' ')
    println(ctx.io, `${e.kind.padEnd(7)} ${formatBytes(e.size).padStart(10)}  ${when}  ${e.name}`)
  }
  println(ctx.io, `${entries.length} entries, ${formatBytes(total)}`)
}
