// `blobcache image-cache [--cache DIR] ls|pull|push|rm|clean|export|import|gc`, after
// `linuxkit cache`. The cache directory defaults to $BLOBCACHE_IMAGE_CACHE, else
// ~/.cache/blobcache/images.
import { randomBytes } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { open, rename, rm } from 'node:fs/promises'
import { homedir } from 'node:os'
import { basename, dirname, join, resolve } from 'node:path'
import type { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { type Command, InvalidArgumentError, Option } from 'commander'
import { ImageCache } from '../../image-cache/index.js'
import { openNewFile } from '../../io/new-file.js'
import { parsePlatform } from '../../manifest.js'
import { type RunContext, attempt, formatBytes, parseDuration, printJSON, println } from '../io.js'
import { REGISTRIES_CONF_FLAGS, addRegistryFlags, registryOptions } from '../registry-flags.js'

interface GlobalFlags {
  cache?: string
}

/** The cache directory: --cache, else $BLOBCACHE_IMAGE_CACHE, else ~/.cache/blobcache/images. */
export function imageCacheDir(ctx: RunContext, flag?: string): string {
  if (flag) return resolve(flag)
  const env = ctx.io.env.BLOBCACHE_IMAGE_CACHE
  if (env) return resolve(env)
  return join(ctx.io.env.HOME || homedir(), '.cache', 'blobcache', 'images')
}

function platformArg(value: string, previous: string[] = []): string[] {
  try {
    parsePlatform(value)
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message)
  }
  return [...previous, value]
}

function oneValue(value: string): string {
  return platformArg(value)[0]
}

/** Writes a stream to `outfile` (`-`: stdout) through a temp file and a rename, so an existing longer file is replaced whole. */
async function writeOut(ctx: RunContext, stream: Readable, outfile: string): Promise<void> {
  if (outfile === '-') {
    await pipeline(stream, ctx.io.stdout, { signal: ctx.signal, end: false })
    return
  }
  const target = resolve(outfile)
  const tmp = join(dirname(target), `.tmp-${basename(target)}-${randomBytes(6).toString('hex')}`)
  try {
    const out = await openNewFile(tmp, { mode: 0o666 }).catch((err: unknown) => {
      stream.destroy()
      throw err
    })
    await pipeline(stream, out, { signal: ctx.signal })
    const fh = await open(tmp, 'r+')
    try {
      await fh.sync()
    } finally {
      await fh.close()
    }
    await rename(tmp, target)
  } finally {
    await rm(tmp, { force: true })
  }
}

/** Adds `blobcache image-cache …` to the program. */
export function addImageCacheCommand(program: Command, ctx: RunContext): void {
  const group = program
    .command('image-cache')
    .description('manage an OCI-layout image cache (linuxkit cache): ls, pull, push, rm, clean, export, import, gc')
    .option('--cache <dir>', 'cache directory (default: $BLOBCACHE_IMAGE_CACHE or ~/.cache/blobcache/images)')
  const openCache = async (cmd: Command, registry?: ReturnType<typeof registryOptions>) => {
    const { cache } = cmd.optsWithGlobals<GlobalFlags>()
    return ImageCache.open(imageCacheDir(ctx, cache), registry ? { registry } : {})
  }

  group
    .command('ls')
    .description('list the named images: name and root digest')
    .option('--json', 'print JSON')
    .action(async (flags: { json?: boolean }, cmd: Command) => {
      await attempt(ctx, 'listing the image cache', async () => {
        const entries = await (await openCache(cmd)).list({ signal: ctx.signal })
        if (flags.json) printJSON(ctx.io, entries.map((e) => ({ name: e.name, digest: e.descriptor.digest, mediaType: e.descriptor.mediaType, size: e.descriptor.size })))
        else for (const e of entries) println(ctx.io, `${e.name} ${e.descriptor.digest}`)
      })
    })

  const pull = group
    .command('pull')
    .description('pull images into the cache (only missing blobs of the given platforms)')
    .argument('<name...>', 'image names, e.g. alpine:3.19')
    .addOption(new Option('--platform <os/arch[/variant]>', 'platform to pull; repeat for several (default: this machine)').argParser(platformArg))
    .option('--always-pull', 'ask the registry even when the cache has the image whole')
    .option(...REGISTRIES_CONF_FLAGS)
  addRegistryFlags(pull, '', 'image')
  pull.action(async (names: string[], flags: { platform?: string[]; alwaysPull?: boolean }, cmd: Command) => {
    const registry = registryOptions(flags as Record<string, unknown>, '')
    for (const name of names) {
      await attempt(ctx, `pulling ${name}`, async () => {
        const cache = await openCache(cmd, registry)
        const d = await cache.imagePull(name, { platforms: flags.platform, alwaysPull: flags.alwaysPull, signal: ctx.signal })
        println(ctx.io, `${d.annotations?.['org.opencontainers.image.ref.name'] ?? name} ${d.digest}`)
      })
    }
  })

  const push = group
    .command('push')
    .description('push an image of the cache to its registry')
    .argument('<name>', 'image name in the cache')
    .option('--remote-name <name>', 'name to push to (default: the same name)')
    .option('--with-arch-tags', 'also tag each platform as <tag>-<arch>')
    .option('--override', 'replace (for an index: merge into) an existing remote tag')
  addRegistryFlags(push, '', 'image')
  push.action(async (name: string, flags: { remoteName?: string; withArchTags?: boolean; override?: boolean }, cmd: Command) => {
    await attempt(ctx, `pushing ${name}`, async () => {
      const cache = await openCache(cmd, registryOptions(flags as Record<string, unknown>, ''))
      const r = await cache.push(name, { remoteName: flags.remoteName, archTags: flags.withArchTags, override: flags.override, signal: ctx.signal })
      if (!r.pushed) println(ctx.io, `${flags.remoteName ?? name} exists (${r.digest}); not pushed (use --override)`)
      else println(ctx.io, `pushed ${flags.remoteName ?? name} ${r.digest}${r.tags.length > 1 ? ` (tags: ${r.tags.join(', ')})` : ''}`)
      for (const p of r.dropped) println(ctx.io, `left out ${p}: not whole in the cache or the registry`)
    })
  })

  group
    .command('rm')
    .description('remove images from the cache, with blobs no other image uses')
    .argument('<name...>', 'image names')
    .action(async (names: string[], _flags: unknown, cmd: Command) => {
      for (const name of names) {
        await attempt(ctx, `removing ${name}`, async () => {
          const cache = await openCache(cmd)
          println(ctx.io, (await cache.remove(name, { signal: ctx.signal })) ? `removed ${name}` : `${name} is not in the cache`)
        })
      }
    })

  const clean = group
    .command('clean')
    .description('remove every image (with --published-only: those whose registry tag has the same digest)')
    .option('--published-only', 'remove only images whose registry tag resolves to the cached digest')
  addRegistryFlags(clean, '', 'image')
  clean.action(async (flags: { publishedOnly?: boolean }, cmd: Command) => {
    await attempt(ctx, 'cleaning the image cache', async () => {
      const cache = await openCache(cmd, registryOptions(flags as Record<string, unknown>, ''))
      const removed = await cache.clean({ publishedOnly: flags.publishedOnly, signal: ctx.signal })
      for (const n of removed) println(ctx.io, `removed ${n}`)
      println(ctx.io, `removed ${removed.length} images`)
    })
  })

  group
    .command('export')
    .description('write one image of the cache as an OCI tar, a docker load tar, or its flattened file system')
    .argument('<name>', 'image name in the cache')
    .addOption(new Option('--format <format>', 'what to write').choices(['oci', 'docker', 'filesystem']).default('oci'))
    .addOption(new Option('--platform <os/arch[/variant]>', 'platform to export (default: this machine)').argParser(oneValue))
    .requiredOption('--outfile <file>', 'file to write, - for stdout')
    .option('--name <name>', 'name to record in the tar (oci, docker) instead of the image name')
    .action(async (name: string, flags: { format: 'oci' | 'docker' | 'filesystem'; platform?: string; outfile: string; name?: string }, cmd: Command) => {
      await attempt(ctx, `exporting ${name}`, async () => {
        const source = await (await openCache(cmd)).newSource(name, flags.platform, { signal: ctx.signal })
        const opts = { signal: ctx.signal, ...(flags.name ? { name: flags.name } : {}) }
        const stream = flags.format === 'docker' ? source.v1TarReader(opts) : flags.format === 'filesystem' ? source.tarReader(opts) : source.ociTarReader(opts)
        await writeOut(ctx, stream, flags.outfile)
      })
    })

  group
    .command('import')
    .description('load an OCI image tar (buildkit, docker save, export --format oci) into the cache')
    .argument('<file>', 'tar file, - for stdin')
    .action(async (file: string, _flags: unknown, cmd: Command) => {
      await attempt(ctx, `importing ${file}`, async () => {
        const input = file === '-' ? process.stdin : createReadStream(file, { highWaterMark: 1 << 20 })
        const descriptors = await (await openCache(cmd)).imageLoad(input, { signal: ctx.signal })
        for (const d of descriptors) println(ctx.io, `${d.annotations?.['org.opencontainers.image.ref.name'] ?? '(unnamed)'} ${d.digest}`)
      })
    })

  group
    .command('gc')
    .description('remove blobs no image uses, temporary files and abandoned ingests')
    .option('--grace <duration>', 'keep unreferenced files younger than this (e.g. 10m, 0s)', parseDuration)
    .option('--verify', 'also hash every blob and remove damaged ones')
    .option('--json', 'print the report as JSON')
    .action(async (flags: { grace?: number; verify?: boolean; json?: boolean }, cmd: Command) => {
      await attempt(ctx, 'collecting garbage', async () => {
        const report = await (await openCache(cmd)).gc({ graceMs: flags.grace, verify: flags.verify, signal: ctx.signal })
        if (flags.json) return printJSON(ctx.io, report)
        for (const d of report.damaged) println(ctx.io, `removed damaged ${d}`)
        println(ctx.io, `removed ${report.removed.length} unused blobs and ${report.leftovers} leftovers, freed ${formatBytes(report.freedBytes)}, kept ${report.kept} blobs`)
      })
    })
}
