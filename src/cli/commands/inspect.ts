import { type Command, Option } from 'commander'
import { ImageError } from '../../errors.js'
import { type SourceManifest, readConfig, readManifest } from '../../image.js'
import { type ImageManifest, type Platform, choosePlatform } from '../../manifest.js'
import { parseImageName } from '../../transports/index.js'
import type { CallOptions, ImageSource } from '../../types.js'
import { REGISTRIES_CONF_FLAGS, addRegistryFlags, registryOptions } from '../registry-flags.js'
import { type RunContext, attempt, platformArg, printJSON } from '../io.js'

interface InspectFlags {
  raw?: boolean
  config?: boolean
  platform?: Platform
}

/** The fields of an image config that inspect shows. */
interface ImageConfig {
  created?: string
  docker_version?: string
  architecture?: string
  os?: string
  variant?: string
  config?: { Labels?: Record<string, string> | null; Env?: string[] | null }
}

/**
 * What `blobcache inspect IMAGE` prints: the fields of `skopeo inspect`, in its order. Digest is
 * the top-level manifest's; the rest comes from the image chosen for the platform.
 */
export interface InspectOutput {
  Name?: string
  Digest: string
  RepoTags: string[]
  Created: string | null
  DockerVersion: string
  Labels: Record<string, string> | null
  Architecture: string
  Variant?: string
  Os: string
  Layers: string[]
  LayersData: { MIMEType: string; Digest: string; Size: number; Annotations: Record<string, string> | null }[]
  Env: string[] | null
}

/** Adds `blobcache inspect [--raw] [--config] IMAGE` to the program. */
export function addInspectCommand(program: Command, ctx: RunContext): void {
  const cmd = program
    .command('inspect')
    .description('show an image: skopeo-style summary, its manifest (--raw) or its config (--config)')
    .argument('<image>', 'image name, transport:reference')
    .option('--raw', 'print the top-level manifest (with --config: the config blob) exactly as stored')
    .option('--config', 'print the image config (for a list: of the image chosen for the platform)')
    .addOption(new Option('--platform <os/arch[/variant]>', 'choose this platform from a list (default: this machine)').argParser(platformArg))
    .option(...REGISTRIES_CONF_FLAGS)
  addRegistryFlags(cmd, '', 'image')
  cmd.action(async (name: string, flags: InspectFlags) => {
      await attempt(ctx, `inspecting ${name}`, () => runInspect(ctx, name, flags))
    })
}

async function runInspect(ctx: RunContext, name: string, flags: InspectFlags): Promise<void> {
  const { io, signal } = ctx
  const ref = parseImageName(name)
  const registry = registryOptions(flags as unknown as Record<string, unknown>, '')
  const src = await ref.newImageSource({ signal, ...(io.env.TMPDIR ? { tmpDir: io.env.TMPDIR } : {}), ...(registry ? { registry } : {}) })
  try {
    if (flags.raw && !flags.config) {
      const { bytes } = await src.getManifest(undefined, { signal })
      io.stdout.write(bytes)
      return
    }
    const top = await readManifest(src, undefined, { signal })
    const manifest = await chooseImage(src, top, flags.platform, { signal })
    const configBytes = await readConfig(src, manifest, { signal })
    if (flags.config) {
      if (flags.raw) io.stdout.write(configBytes)
      else printJSON(io, JSON.parse(configBytes.toString('utf8')), 4)
      return
    }
    const config = JSON.parse(configBytes.toString('utf8')) as ImageConfig
    const named = ref.dockerReference()
    const out: InspectOutput = {
      ...(named ? { Name: named.name() } : {}),
      Digest: top.digest,
      RepoTags: [],
      Created: config.created ? goTime(config.created) : null,
      DockerVersion: config.docker_version ?? '',
      Labels: config.config?.Labels ?? null,
      Architecture: config.architecture ?? '',
      ...(config.variant ? { Variant: config.variant } : {}),
      Os: config.os ?? '',
      Layers: manifest.layers.map((l) => l.digest),
      LayersData: manifest.layers.map((l) => ({
        MIMEType: l.mediaType,
        Digest: l.digest,
        Size: l.size,
        Annotations: l.annotations ?? null,
      })),
      Env: config.config?.Env ?? null,
    }
    printJSON(io, out, 4)
  } finally {
    await src.close()
  }
}

/** The image manifest itself, or for a list the instance chosen for the platform. */
async function chooseImage(src: ImageSource, top: SourceManifest, platform: Platform | undefined, opts: CallOptions): Promise<ImageManifest> {
  if (top.kind === 'image') return top.manifest
  const chosen = choosePlatform(top.index, platform)
  const instance = await readManifest(src, chosen.digest, opts)
  if (instance.kind !== 'image') throw new ImageError('MANIFEST_INVALID', `instance ${chosen.digest} of the list is itself a list`)
  return instance.manifest
}

/**
 * A config's `created` the way skopeo prints it (Go's RFC 3339 with nanoseconds): the
 * fraction without trailing zeros, a zero offset as Z. Other strings are kept as they are.
 */
export function goTime(s: string): string {
  const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/i.exec(s)
  if (!m) return s
  const fraction = (m[2] ?? '').slice(0, 9).replace(/0+$/, '')
  const offset = /^[+-]00:00$/.test(m[3]) ? 'Z' : m[3].toUpperCase()
  return `${m[1]}${fraction ? '.' + fraction : ''}${offset}`
}
