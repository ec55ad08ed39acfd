import { mkdir } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { type Command, Option } from 'commander'
import { BlobCache, type SharedStats, type SharedTier } from '../../blobcache/index.js'
import { type CopyOptions, copyImage } from '../../copy.js'
import type { Platform } from '../../manifest.js'
import { parseImageName } from '../../transports/index.js'
import type { CompressionAlgorithm, ImageReference, LayerCompression, SystemContext } from '../../types.js'
import { isTransient } from '../../registry/retry.js'
import { writeFileAtomic } from '../../transports/fs-util.js'
import { type RunContext, attempt, describeError, parseCount, parseDuration, platformArg, printJSON } from '../io.js'
import { createProgress } from '../progress.js'
import { REGISTRIES_CONF_FLAGS, addRegistryFlags, registryOptions } from '../registry-flags.js'
import { type SharedCacheFlags, SharedReporter, addSharedCacheFlags, openSharedTier, sharedFlagsProblem } from '../shared-cache.js'

/** The parsed flags of `blobcache copy`. */
interface CopyFlags extends SharedCacheFlags {
  all?: boolean
  platform?: Platform
  destCompress?: boolean
  destDecompress?: boolean
  destCompressFormat?: CompressionAlgorithm
  destCompressLevel?: number
  format?: 'oci' | 'v2s2'
  preserveDigests?: boolean
  removeSignatures?: boolean
  rewriteExisting?: boolean
  quiet?: boolean
  json?: boolean
  blobCache?: string
  cacheCompression?: LayerCompression
  cacheCompressFormat?: CompressionAlgorithm
  authfile?: string
  digestfile?: string
  retryTimes?: number
  retryDelay?: number
}

/** What `copy --json` prints. */
export interface CopySummary {
  manifestDigest: string
  mediaType: string
  blobs: { copied: number; reused: number }
  bytes: number
  /** Manifests the destination already held under their names, and that were not written again (see CopyResult.present). */
  present: string[]
  cache?: { hits: number; misses: number; errors: number }
  /** The shared cache tier's counts, after the flush (with --shared-cache). */
  shared?: SharedStats
}

/** Adds `blobcache copy [flags] SRC DEST` to the program. */
export function addCopyCommand(program: Command, ctx: RunContext): void {
  const cmd = program
    .command('copy')
    .description('copy an image (or image list) from SRC to DEST, e.g. oci:/src:latest dir:/dest')
    .argument('<src>', 'source image name, transport:reference')
    .argument('<dest>', 'destination image name, transport:reference')
    .addOption(new Option('-a, --all', 'copy every image of a list, not only the one for this platform').conflicts('platform'))
    .addOption(new Option('--platform <os/arch[/variant]>', 'copy the image for this platform from a list').argParser(platformArg))
    .addOption(new Option('--dest-compress', 'compress layers at the destination (gzip unless --dest-compress-format)').conflicts('destDecompress'))
    .addOption(new Option('--dest-decompress', 'decompress layers at the destination').conflicts('destCompressFormat'))
    .addOption(new Option('--dest-compress-format <alg>', 'compress layers with this algorithm (implies --dest-compress)').choices(['gzip', 'zstd']))
    .addOption(new Option('--dest-compress-level <n>', 'compression level for --dest-compress (gzip 1-9, default 4; zstd 1-22, default 3)').argParser(parseCount))
    .addOption(new Option('-f, --format <format>', 'manifest format of the destination').choices(['oci', 'v2s2']))
    .option('--preserve-digests', 'fail rather than change any digest (no conversion or recompression)')
    .option('--remove-signatures', 'do not copy signatures')
    .option('--rewrite-existing', 'write an image even when the destination already has its manifest under that name (docker://)')
    .option('-q, --quiet', 'print no progress')
    .option('--json', 'print one JSON summary at the end (and no progress)')
    .option('--blob-cache <dir>', 'keep every blob in this cache directory and read blobs from it (created if missing)')
    .addOption(new Option('--cache-compression <mode>', 'what the cache substitutes for layers it holds (default: preserve)').choices(['preserve', 'compress', 'decompress']))
    .addOption(new Option('--cache-compress-format <alg>', 'algorithm of compressed variants the cache offers (default: gzip)').choices(['gzip', 'zstd']))
    .option('--authfile <file>', 'auth file for every registry (source, destination, shared cache)')
    .option('--digestfile <file>', 'write the digest of the copied manifest to this file')
    .option(...REGISTRIES_CONF_FLAGS)
    .addOption(new Option('--retry-times <n>', 'copy again up to n times after a failure that may pass (network, 5xx, 429)').argParser(parseCount))
    .addOption(
      new Option('--retry-delay <duration>', 'wait this long before each new attempt (default: 1s, doubled each time)').argParser(parseDuration),
    )
  addRegistryFlags(cmd, 'src-', 'source')
  addRegistryFlags(cmd, 'dest-', 'destination')
  addSharedCacheFlags(cmd)
  cmd.action(async (srcName: string, destName: string, flags: CopyFlags, cmd: Command) => {
      const usage = (message: string) => cmd.error(`error: ${message}`, { exitCode: 2, code: 'blobcache.usage' })
      if (!flags.blobCache && (flags.cacheCompression || flags.cacheCompressFormat)) {
        usage('--cache-compression and --cache-compress-format need --blob-cache')
      }
      const problem = sharedFlagsProblem(flags)
      if (problem) usage(problem)
      const reporter = new SharedReporter(ctx.io, flags.quiet === true || flags.json === true)
      const tier = openSharedTier(flags, reporter)
      if (typeof tier === 'string') usage(tier)
      const shared = typeof tier === 'string' ? undefined : tier
      await attempt(ctx, `copying ${srcName} to ${destName}`, () =>
        withCopyRetries(ctx, flags, () => runCopy(ctx, srcName, destName, flags, shared && { tier: shared, reporter })),
      )
    })
}

/**
 * Runs `copy` once, and again up to `--retry-times` times after a failure that may pass (what
 * the registry client itself retries: connection errors, timeouts, 5xx, 429), as skopeo does,
 * waiting `--retry-delay` between attempts (default 1 s, doubled each time). Destinations
 * show nothing of a failed attempt, so a new one starts clean; an abort (Ctrl-C) is never retried.
 */
export async function withCopyRetries(ctx: RunContext, flags: Pick<CopyFlags, 'retryTimes' | 'retryDelay'>, copy: () => Promise<void>): Promise<void> {
  const times = flags.retryTimes ?? 0
  for (let failures = 0; ; failures++) {
    try {
      return await copy()
    } catch (err) {
      if (failures >= times || ctx.signal.aborted || !isTransient(err)) throw err
      const wait = flags.retryDelay ?? 1000 * 2 ** failures
      ctx.io.stderr.write(`blobcache: warning: copy failed (${describeError(err)}); attempt ${failures + 2} of ${times + 1} in ${wait / 1000} s\n`)
      await sleep(wait, undefined, { signal: ctx.signal }).catch(() => {
        throw err
      })
    }
  }
}

async function runCopy(
  ctx: RunContext,
  srcName: string,
  destName: string,
  flags: CopyFlags,
  shared?: { tier: SharedTier; reporter: SharedReporter },
): Promise<void> {
  const { io, signal } = ctx
  let src: ImageReference = parseImageName(srcName)
  let dest: ImageReference = parseImageName(destName)
  const caches: BlobCache[] = []
  if (flags.blobCache) {
    await mkdir(flags.blobCache, { recursive: true })
    const mode = flags.cacheCompression ?? 'preserve'
    // both wrappers use the one tier, so that its uploads are deduplicated and flushed together
    const options = { compressAlgorithm: flags.cacheCompressFormat ?? 'gzip', ...(shared ? { shared: shared.tier } : {}) }
    src = new BlobCache(src, flags.blobCache, mode, options)
    dest = new BlobCache(dest, flags.blobCache, mode, options)
    caches.push(src as BlobCache, dest as BlobCache)
  }

  const base: SystemContext = { signal, ...(io.env.TMPDIR ? { tmpDir: io.env.TMPDIR } : {}) }
  const all = flags as unknown as Record<string, unknown>
  const sourceRegistry = registryOptions(all, 'src', flags.authfile)
  const destRegistry = registryOptions(all, 'dest', flags.authfile)
  const progress = createProgress(io, flags.quiet || flags.json ? 'quiet' : io.isTTY ? 'bars' : 'lines')
  const options: CopyOptions = {
    signal,
    imageListSelection: flags.all ? 'all' : 'single',
    platform: flags.platform,
    compression: flags.destDecompress ? 'decompress' : flags.destCompress || flags.destCompressFormat ? 'compress' : undefined,
    compressionAlgorithm: flags.destCompressFormat,
    compressionLevel: flags.destCompressLevel,
    manifestFormat: flags.format,
    preserveDigests: flags.preserveDigests,
    removeSignatures: flags.removeSignatures,
    rewriteExisting: flags.rewriteExisting,
    onProgress: (e) => progress.onProgress(e),
    sourceCtx: sourceRegistry ? { ...base, registry: sourceRegistry } : base,
    destCtx: destRegistry ? { ...base, registry: destRegistry } : base,
  }
  let ok = false
  let result
  let sharedStats: SharedStats | undefined
  try {
    try {
      result = await copyImage(src, dest, options)
      ok = true
    } finally {
      progress.finish(ok, result && result.present.includes(result.digest) ? result.digest : undefined)
    }
  } finally {
    // copyImage has closed the destination (its background variants are queued by now); the
    // entries cached so far are pushed even when the copy failed. Never throws.
    if (shared) sharedStats = await shared.reporter.flush(shared.tier, signal)
  }

  const summary: CopySummary = {
    manifestDigest: result.digest,
    mediaType: result.mediaType,
    blobs: { copied: result.copied, reused: result.reused },
    bytes: result.bytes,
    present: result.present,
  }
  if (caches.length > 0) {
    const cache = { hits: 0, misses: 0, errors: 0 }
    for (const c of caches) {
      cache.hits += c.stats.hits
      cache.misses += c.stats.misses
      cache.errors += c.stats.errors
    }
    summary.cache = cache
  }
  if (shared && sharedStats) summary.shared = sharedStats
  // as skopeo writes it: the digest alone, no newline (atomically here: never half a digest)
  if (flags.digestfile) await writeFileAtomic(flags.digestfile, result.digest)
  if (flags.json) printJSON(io, summary)
  else if (!flags.quiet && summary.cache) {
    const { hits, misses, errors } = summary.cache
    io.stdout.write(`Blob cache ${flags.blobCache}: ${hits} hits, ${misses} misses, ${errors} errors\n`)
    if (shared && sharedStats) {
      const s = sharedStats
      io.stdout.write(
        `Shared cache ${shared.tier.name}: ${s.hits} hits, ${s.misses} misses, ${s.uploaded} uploaded, ${s.mounted} mounted, ` +
          `${s.skipped} already there, ${s.failed + s.dropped} not pushed, ${s.errors} errors\n`,
      )
    }
  }
}
