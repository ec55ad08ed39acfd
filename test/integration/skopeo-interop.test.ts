// Interop with the real skopeo, in both directions, for every local transport:
//   (a) we write an image to T; skopeo inspects it (the raw manifest is our bytes) and copies it
//       to an oci: layout, keeping every digest;
//   (b) skopeo writes T from a layout we generated; we copy T to oci: and every blob verifies and
//       the manifest digest is kept.
// docker-archive has no manifest of its own (both tools synthesise one), so there the config
// and layer digests are compared instead. Last, layers we (re)compress are read back by skopeo.
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it, onTestFinished } from 'vitest'
import { copyImage } from '../../src/copy.js'
import { digestOf, parseDigest } from '../../src/digest.js'
import { parseManifest } from '../../src/manifest.js'
import { parseImageName } from '../../src/transports/index.js'
import { peer } from '../helpers/peers.js'
import { writeRandomImage, type RandomImage } from '../helpers/random-image.js'
import { skopeoInspect, skopeoInspectRaw, skopeoOk } from '../helpers/skopeo.js'

const hasSkopeo = peer('skopeo') !== undefined

type Transport = 'dir' | 'oci' | 'oci-archive' | 'docker-archive'

/** The image name of `base` in transport `t`; the same string means the same to skopeo and us. */
function nameIn(t: Transport, base: string, forWriting = true): string {
  switch (t) {
    case 'dir':
      return `dir:${base}`
    case 'oci':
      return `oci:${base}:latest`
    case 'oci-archive':
      return `oci-archive:${base}.tar:latest`
    case 'docker-archive':
      return forWriting ? `docker-archive:${base}.tar:example.com/interop/image:latest` : `docker-archive:${base}.tar`
  }
}

async function scratch(): Promise<string> {
  const root = await mkdtemp(join(tmpdir(), 'blobcache-skopeo-'))
  onTestFinished(() => rm(root, { recursive: true, force: true }))
  return root
}

interface LayoutCheck {
  manifestDigest: string
  manifest: Buffer
  configDigest: string
  layerDigests: string[]
  layerMediaTypes: string[]
}

/**
 * Reads the one image of the OCI layout at `dir` and checks it the hard way: every file under
 * blobs/ hashes to its name, and the manifest, config and every layer are there with the
 * described sizes.
 */
async function checkLayout(dir: string): Promise<LayoutCheck> {
  const blobDir = join(dir, 'blobs', 'sha256')
  for (const name of await readdir(blobDir)) {
    expect(name.startsWith('.tmp-')).toBe(false)
    expect(digestOf(await readFile(join(blobDir, name)))).toBe(`sha256:${name}`)
  }
  const index = JSON.parse(await readFile(join(dir, 'index.json'), 'utf8')) as { manifests: { digest: string; size: number }[] }
  expect(index.manifests).toHaveLength(1)
  const top = index.manifests[0]
  const blob = (d: string) => readFile(join(blobDir, parseDigest(d).slice('sha256:'.length)))
  const manifest = await blob(top.digest)
  expect(manifest.length).toBe(top.size)
  const parsed = parseManifest(manifest)
  if (parsed.kind !== 'image') throw new Error('expected an image manifest')
  const m = parsed.manifest
  for (const d of [m.config, ...m.layers]) expect((await blob(d.digest)).length).toBe(d.size)
  return {
    manifestDigest: top.digest,
    manifest,
    configDigest: m.config.digest,
    layerDigests: m.layers.map((l) => l.digest),
    layerMediaTypes: m.layers.map((l) => l.mediaType),
  }
}

/** The image as generated for transport `t` (docker-archive holds schema 2 with plain tar layers). */
function generateFor(t: Transport) {
  return t === 'docker-archive' ? ({ format: 'v2s2', compression: null } as const) : ({ format: 'oci' } as const)
}

const TRANSPORTS: Transport[] = ['dir', 'oci', 'oci-archive', 'docker-archive']

describe.skipIf(!hasSkopeo)('skopeo reads what we write', () => {
  it.each(TRANSPORTS)('%s', async (t) => {
    const root = await scratch()
    const base = join(root, 'ours')
    const image: RandomImage = await writeRandomImage(parseImageName(nameIn(t, base)), { layers: 3, layerSize: 50_000, seed: 7, ...generateFor(t) })
    const readName = nameIn(t, base, false)

    const info = await skopeoInspect(readName)
    expect(info.Architecture).toBe('amd64')
    expect(info.Os).toBe('linux')
    expect(info.Layers).toEqual(image.layers.map((l) => l.digest))
    const raw = await skopeoInspectRaw(readName)
    if (t === 'docker-archive') {
      const synthesised = JSON.parse(raw.toString('utf8')) as { config: { digest: string } }
      expect(synthesised.config.digest).toBe(image.configDigest)
    } else {
      expect(raw.equals(image.manifest)).toBe(true)
      expect(info.Digest).toBe(image.manifestDigest)
    }

    const out = join(root, 'skopeo-out')
    // skopeo gzips plain tar layers on their way into oci: unless told not to
    await skopeoOk(['copy', '-q', '--dest-oci-accept-uncompressed-layers', readName, `oci:${out}:latest`])
    const copied = await checkLayout(out)
    expect(copied.configDigest).toBe(image.configDigest)
    expect(copied.layerDigests).toEqual(image.layers.map((l) => l.digest))
    if (t !== 'docker-archive') {
      expect(copied.manifestDigest).toBe(image.manifestDigest)
      expect(copied.manifest.equals(image.manifest)).toBe(true)
    }
  })
})

describe.skipIf(!hasSkopeo)('we read what skopeo writes', () => {
  it.each(TRANSPORTS)('%s', async (t) => {
    const root = await scratch()
    const gen = join(root, 'generated')
    const image = await writeRandomImage(parseImageName(`oci:${gen}:latest`), { layers: 3, layerSize: 50_000, seed: 11 })
    const written = join(root, 'skopeo')
    await skopeoOk(['copy', '-q', `oci:${gen}:latest`, nameIn(t, written)])

    const out = join(root, 'ours')
    const result = await copyImage(parseImageName(nameIn(t, written, false)), parseImageName(`oci:${out}:latest`))
    const copied = await checkLayout(out)
    expect(result.digest).toBe(copied.manifestDigest)
    expect(copied.configDigest).toBe(image.configDigest)
    if (t === 'docker-archive') {
      // skopeo stores docker-archive layers uncompressed: their digests are the diff IDs, and we
      // keep them as they are (an oci: destination preserves compression).
      expect(copied.layerDigests).toEqual(image.layers.map((l) => l.diffID))
    } else {
      expect(copied.layerDigests).toEqual(image.layers.map((l) => l.digest))
      expect(copied.manifestDigest).toBe(image.manifestDigest)
      expect(copied.manifest.equals(image.manifest)).toBe(true)
    }
    // and skopeo agrees with the result
    const info = await skopeoInspect(`oci:${out}:latest`)
    expect(info.Digest).toBe(copied.manifestDigest)
  })
})

describe.skipIf(!hasSkopeo)('compression conversions, checked by skopeo', () => {
  it.each([
    ['gzip', 'application/vnd.oci.image.layer.v1.tar+gzip'],
    ['zstd', 'application/vnd.oci.image.layer.v1.tar+zstd'],
  ] as const)('we compress plain layers with %s; skopeo decompresses them to the diff IDs', async (algorithm, mediaType) => {
    const root = await scratch()
    const plain = join(root, 'plain')
    const image = await writeRandomImage(parseImageName(`oci:${plain}:latest`), { layers: 2, layerSize: 200_000, compression: null, seed: 3 })
    const ours = join(root, 'ours')
    await copyImage(parseImageName(`oci:${plain}:latest`), parseImageName(`oci:${ours}:latest`), {
      compression: 'compress',
      compressionAlgorithm: algorithm,
    })
    const compressed = await checkLayout(ours)
    expect(compressed.layerMediaTypes).toEqual([mediaType, mediaType])
    expect(compressed.layerDigests).not.toEqual(image.layers.map((l) => l.digest))

    const info = await skopeoInspect(`oci:${ours}:latest`)
    expect(info.Layers).toEqual(compressed.layerDigests)
    const raw = JSON.parse((await skopeoInspectRaw(`oci:${ours}:latest`)).toString('utf8')) as { layers: { mediaType: string }[] }
    expect(raw.layers.map((l) => l.mediaType)).toEqual([mediaType, mediaType])
    const back = join(root, 'back')
    await skopeoOk(['copy', '-q', '--dest-decompress', `oci:${ours}:latest`, `dir:${back}`])
    const manifest = JSON.parse(await readFile(join(back, 'manifest.json'), 'utf8')) as { layers: { digest: string }[] }
    expect(manifest.layers.map((l) => l.digest)).toEqual(image.layers.map((l) => l.diffID))
  })

  it.each(['gzip', 'zstd'] as const)('skopeo compresses with %s; we decompress to the diff IDs', async (algorithm) => {
    const root = await scratch()
    const gen = join(root, 'generated')
    const image = await writeRandomImage(parseImageName(`oci:${gen}:latest`), { layers: 2, layerSize: 200_000, compression: null, seed: 5 })
    const theirs = join(root, 'skopeo')
    await skopeoOk(['copy', '-q', '--dest-compress', '--dest-compress-format', algorithm, `oci:${gen}:latest`, `dir:${theirs}`])
    const out = join(root, 'ours')
    await copyImage(parseImageName(`dir:${theirs}`), parseImageName(`oci:${out}:latest`), { compression: 'decompress' })
    const plain = await checkLayout(out)
    expect(plain.layerDigests).toEqual(image.layers.map((l) => l.diffID))
    expect(plain.layerMediaTypes).toEqual(image.layers.map(() => 'application/vnd.oci.image.layer.v1.tar'))
  })

  it('zstd layers we write to an oci-archive are read by skopeo', async () => {
    const root = await scratch()
    const gen = join(root, 'generated')
    const image = await writeRandomImage(parseImageName(`oci:${gen}:latest`), { layers: 2, layerSize: 100_000, seed: 9 })
    await copyImage(parseImageName(`oci:${gen}:latest`), parseImageName(`oci-archive:${root}/z.tar:latest`), {
      compression: 'compress',
      compressionAlgorithm: 'zstd',
    })
    const back = join(root, 'back')
    await skopeoOk(['copy', '-q', '--dest-decompress', `oci-archive:${root}/z.tar:latest`, `dir:${back}`])
    const manifest = JSON.parse(await readFile(join(back, 'manifest.json'), 'utf8')) as { layers: { digest: string }[] }
    expect(manifest.layers.map((l) => l.digest)).toEqual(image.layers.map((l) => l.diffID))
  })
})
