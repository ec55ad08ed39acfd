// Bad input: every case must fail with a typed error code, write nothing outside the
// destination, and leave no partial blob and no `.tmp-` file anywhere. Fixtures are built by
// hand here (not through the library) so that they can be exactly as broken as each case needs.
import { mkdir, mkdtemp, readdir, rm, stat, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import { describe, expect, it, onTestFinished } from 'vitest'
import { copyImage } from '../../src/copy.js'
import { digestHex, digestOf, parseDigest } from '../../src/digest.js'
import { parseNormalizedNamed } from '../../src/name.js'
import { parseImageName } from '../../src/transports/index.js'

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json'
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json'
const OCI_CONFIG = 'application/vnd.oci.image.config.v1+json'
const OCI_LAYER = 'application/vnd.oci.image.layer.v1.tar+gzip'
const REF_NAME = 'org.opencontainers.image.ref.name'

interface Fixture {
  root: string
  src: string
  dest: string
  /** A directory outside source and destination that MUST stay empty. */
  sentinel: string
  /** The tmpDir given to sources and destinations; MUST be empty after each call. */
  scratch: string
}

async function fixture(): Promise<Fixture> {
  const root = await mkdtemp(join(tmpdir(), 'blobcache-bad-input-'))
  onTestFinished(() => rm(root, { recursive: true, force: true }))
  const f = { root, src: join(root, 'src'), dest: join(root, 'dest'), sentinel: join(root, 'sentinel'), scratch: join(root, 'scratch') }
  await Promise.all([mkdir(f.sentinel), mkdir(f.scratch)])
  return f
}

async function walk(dir: string): Promise<string[]> {
  const out: string[] = []
  for (const e of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
    const p = join(dir, e.name)
    out.push(p)
    if (e.isDirectory()) out.push(...(await walk(p)))
  }
  return out
}

/** Nothing outside the destination was written, no temp file remains, no bad blob was named. */
async function expectClean(f: Fixture, badDigests: string[] = []): Promise<void> {
  expect(await readdir(f.sentinel)).toEqual([])
  expect(await readdir(f.scratch)).toEqual([])
  const top = (await readdir(f.root)).filter((n) => !['src', 'src.tar', 'dest', 'dest.tar', 'sentinel', 'scratch', 'outside'].includes(n))
  expect(top).toEqual([])
  const all = await walk(f.root)
  expect(all.filter((p) => p.split('/').pop()!.startsWith('.tmp-'))).toEqual([])
  // an archive destination is written whole or not at all
  await expect(stat(`${f.dest}.tar`)).rejects.toMatchObject({ code: 'ENOENT' })
  const inDest = await walk(f.dest)
  for (const d of badDigests) {
    const hex = d.slice(d.indexOf(':') + 1)
    expect(inDest.filter((p) => p.includes(hex))).toEqual([])
  }
}

const ctx = (f: Fixture) => ({ sourceCtx: { tmpDir: f.scratch }, destCtx: { tmpDir: f.scratch } })

// ---- hand-made images ----------------------------------------------------------------------------

interface RawEntry {
  path: string
  data?: Buffer
  /** '0' file, '1' hardlink, '2' symlink, '5' directory. Default '0'. */
  type?: '0' | '1' | '2' | '5'
  linkname?: string
}

/** A ustar archive that writes names exactly as given, `..` and absolute paths included. */
function rawTar(entries: RawEntry[]): Buffer {
  const blocks: Buffer[] = []
  for (const e of entries) {
    const data = e.data ?? Buffer.alloc(0)
    const h = Buffer.alloc(512)
    h.write(e.path, 0, 100, 'utf8')
    h.write('0000644\0', 100, 'ascii')
    h.write('0000000\0', 108, 'ascii')
    h.write('0000000\0', 116, 'ascii')
    h.write(data.length.toString(8).padStart(11, '0') + '\0', 124, 'ascii')
    h.write('14543021400\0', 136, 'ascii')
    h.write('        ', 148, 'ascii')
    h.write(e.type ?? '0', 156, 'ascii')
    if (e.linkname) h.write(e.linkname, 157, 100, 'utf8')
    h.write('ustar\u000000', 257, 'ascii')
    let sum = 0
    for (const b of h) sum += b
    h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'ascii')
    blocks.push(h, data, Buffer.alloc((512 - (data.length % 512)) % 512))
  }
  blocks.push(Buffer.alloc(1024))
  return Buffer.concat(blocks)
}

interface Image {
  config: Buffer
  layers: Buffer[]
  /** The manifest as an object, to be broken by tests before it is serialised. */
  manifest: Record<string, unknown>
}

function sampleImage(): Image {
  const layers = [0, 1].map((i) => gzipSync(rawTar([{ path: `file-${i}.txt`, data: Buffer.from(`layer ${i}\n`.repeat(2000)) }])))
  const diffIds = [0, 1].map((i) => digestOf(rawTar([{ path: `file-${i}.txt`, data: Buffer.from(`layer ${i}\n`.repeat(2000)) }])))
  const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: diffIds } }))
  const manifest = {
    schemaVersion: 2,
    mediaType: OCI_MANIFEST,
    config: { mediaType: OCI_CONFIG, digest: digestOf(config), size: config.length },
    layers: layers.map((l) => ({ mediaType: OCI_LAYER, digest: digestOf(l), size: l.length })),
  }
  return { config, layers, manifest }
}

interface LayoutOptions {
  /** Manifest bytes to store instead of the serialised `img.manifest`. */
  manifestBytes?: Buffer
  /** index.json content instead of the one naming the manifest as `latest`. */
  index?: unknown
  /** Blobs (by digest) to leave out. */
  omit?: string[]
  /** Bytes to store under a digest instead of the right ones. */
  replace?: Map<string, Buffer>
}

/** Writes `img` as an OCI layout at `dir`; resolves the manifest digest. */
async function writeLayout(dir: string, img: Image, opts: LayoutOptions = {}): Promise<string> {
  const manifest = opts.manifestBytes ?? Buffer.from(JSON.stringify(img.manifest))
  const manifestDigest = digestOf(manifest)
  await mkdir(join(dir, 'blobs', 'sha256'), { recursive: true })
  for (const bytes of [img.config, ...img.layers, manifest]) {
    const d = digestOf(bytes)
    if (opts.omit?.includes(d)) continue
    await writeFile(join(dir, 'blobs', 'sha256', digestHex(d)), opts.replace?.get(d) ?? bytes)
  }
  await writeFile(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }))
  const index = opts.index ?? {
    schemaVersion: 2,
    mediaType: OCI_INDEX,
    manifests: [{ mediaType: OCI_MANIFEST, digest: manifestDigest, size: manifest.length, annotations: { [REF_NAME]: 'latest' } }],
  }
  await writeFile(join(dir, 'index.json'), JSON.stringify(index))
  return manifestDigest
}

/** The entries of an oci-archive holding `img` (as writeLayout would lay it out). */
function layoutEntries(img: Image): RawEntry[] {
  const manifest = Buffer.from(JSON.stringify(img.manifest))
  const index = {
    schemaVersion: 2,
    mediaType: OCI_INDEX,
    manifests: [{ mediaType: OCI_MANIFEST, digest: digestOf(manifest), size: manifest.length, annotations: { [REF_NAME]: 'latest' } }],
  }
  return [
    { path: 'oci-layout', data: Buffer.from(JSON.stringify({ imageLayoutVersion: '1.0.0' })) },
    { path: 'index.json', data: Buffer.from(JSON.stringify(index)) },
    { path: 'blobs/', type: '5' },
    { path: 'blobs/sha256/', type: '5' },
    ...[img.config, ...img.layers, manifest].map((b) => ({ path: `blobs/sha256/${digestHex(digestOf(b))}`, data: b })),
  ]
}

const DESTS = [
  ['oci', (f: Fixture) => `oci:${f.dest}:latest`],
  ['dir', (f: Fixture) => `dir:${f.dest}`],
  ['oci-archive', (f: Fixture) => `oci-archive:${f.dest}.tar:latest`],
  ['docker-archive', (f: Fixture) => `docker-archive:${f.dest}.tar:example.com/bad/input:latest`],
] as const

async function copyNames(f: Fixture, src: string, dest: string) {
  return copyImage(parseImageName(src), parseImageName(dest), ctx(f))
}

// ---- names and digests ---------------------------------------------------------------------------

describe('malformed names and digests', () => {
  it.each([
    ['nosuch:/x', 'TRANSPORT_UNKNOWN'],
    ['no-colon-at-all', 'REFERENCE_INVALID'],
    [':/x', 'REFERENCE_INVALID'],
    ['dir:', 'REFERENCE_INVALID'],
    ['oci:', 'REFERENCE_INVALID'],
    ['oci-archive:', 'REFERENCE_INVALID'],
    ['docker-archive:', 'REFERENCE_INVALID'],
    ['oci:/x:../../y', 'REFERENCE_INVALID'],
    ['oci:/x:-leading-dash', 'REFERENCE_INVALID'],
    ['oci:/x:a/../../y', 'REFERENCE_INVALID'],
    ['oci-archive:/x.tar:../y', 'REFERENCE_INVALID'],
    ['docker-archive:/x.tar:UPPER/Case', 'REFERENCE_INVALID'],
    ['docker-archive:/x.tar:alpine@sha256:../../x', 'REFERENCE_INVALID'],
    ['docker-archive:/x.tar:@-1', 'REFERENCE_INVALID'],
  ])('parseImageName(%j) fails %s', (name, code) => {
    expect(() => parseImageName(name)).toThrow(expect.objectContaining({ code }))
  })

  it.each(['UPPER/Case', 'alpine@sha256:../../x', 'alpine:../x', 'a//b', '/abs', 'alpine:' + 'x'.repeat(129)])(
    'parseNormalizedNamed(%j) fails REFERENCE_INVALID',
    (s) => {
      expect(() => parseNormalizedNamed(s)).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    },
  )

  it.each(['sha256:../../x', 'sha256:', 'sha256:ABCDEF' + '0'.repeat(58), 'md5:' + '0'.repeat(32), '../' + '0'.repeat(64), 'sha256:' + '0'.repeat(63) + '/'])(
    'parseDigest(%j) fails DIGEST_INVALID',
    (s) => {
      expect(() => parseDigest(s)).toThrow(expect.objectContaining({ code: 'DIGEST_INVALID' }))
    },
  )

  it.each(DESTS)('a layer digest with a path in the manifest fails MANIFEST_INVALID (to %s)', async (_, dest) => {
    const f = await fixture()
    const img = sampleImage()
    ;(img.manifest.layers as { digest: string }[])[1].digest = 'sha256:../../../sentinel/pwned'
    await writeLayout(f.src, img)
    await expect(copyNames(f, `oci:${f.src}:latest`, dest(f))).rejects.toMatchObject({ code: 'MANIFEST_INVALID' })
    await expectClean(f)
  })

  it.each(DESTS)('a manifest digest with a path in index.json is refused (to %s)', async (_, dest) => {
    const f = await fixture()
    const img = sampleImage()
    const manifest = Buffer.from(JSON.stringify(img.manifest))
    await writeLayout(f.src, img, {
      index: {
        schemaVersion: 2,
        manifests: [{ mediaType: OCI_MANIFEST, digest: 'sha256:../../../sentinel/x', size: manifest.length, annotations: { [REF_NAME]: 'latest' } }],
      },
    })
    const err = await copyNames(f, `oci:${f.src}:latest`, dest(f)).catch((e: unknown) => e)
    expect(err).toMatchObject({ code: expect.stringMatching(/^(MANIFEST_INVALID|LAYOUT_INVALID|DIGEST_INVALID)$/) })
    await expectClean(f)
  })
})

// ---- broken blobs ----------------------------------------------------------------------------------

describe('blobs that do not match their descriptor', () => {
  const cases = [
    ['truncated layer', (b: Buffer) => b.subarray(0, b.length - 100), 'SIZE_INVALID'],
    ['empty layer', () => Buffer.alloc(0), 'SIZE_INVALID'],
    ['layer with extra bytes', (b: Buffer) => Buffer.concat([b, Buffer.from('trailing')]), 'SIZE_INVALID'],
    ['layer with one byte changed', (b: Buffer) => Buffer.from(b.map((x, i) => (i === b.length >> 1 ? x ^ 0xff : x))), 'DIGEST_INVALID'],
  ] as const
  const table = DESTS.flatMap(([destName, dest]) => cases.map(([what, mangle, code]) => [what, destName, mangle, code, dest] as const))

  it.each(table)('%s (to %s) fails, keeps no blob by that digest', async (_, _destName, mangle, code, dest) => {
    const f = await fixture()
    const img = sampleImage()
    const bad = digestOf(img.layers[1])
    await writeLayout(f.src, img, { replace: new Map([[bad, mangle(img.layers[1])]]) })
    await expect(copyNames(f, `oci:${f.src}:latest`, dest(f))).rejects.toMatchObject({ code })
    await expectClean(f, [bad])
  })

  it('a config with a changed byte fails DIGEST_INVALID and is not stored', async () => {
    const f = await fixture()
    const img = sampleImage()
    const bad = digestOf(img.config)
    const wrong = Buffer.from(img.config.toString().replace('amd64', 'arm64'))
    await writeLayout(f.src, img, { replace: new Map([[bad, wrong]]) })
    await expect(copyNames(f, `oci:${f.src}:latest`, `oci:${f.dest}:latest`)).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await expectClean(f, [bad])
  })

  it('a manifest blob that does not hash to the index digest fails DIGEST_INVALID', async () => {
    const f = await fixture()
    const img = sampleImage()
    const good = Buffer.from(JSON.stringify(img.manifest))
    const digest = await writeLayout(f.src, img)
    await writeFile(join(f.src, 'blobs', 'sha256', digestHex(parseDigest(digest))), Buffer.from(JSON.stringify(img.manifest, null, 1)))
    expect(good.length).toBeGreaterThan(0)
    await expect(copyNames(f, `oci:${f.src}:latest`, `dir:${f.dest}`)).rejects.toMatchObject({
      code: expect.stringMatching(/^(DIGEST_INVALID|SIZE_INVALID)$/),
    })
    await expectClean(f, [digest])
  })
})

// ---- invalid manifests -------------------------------------------------------------------------------

describe('invalid manifests', () => {
  const base = sampleImage().manifest
  const layer0 = (base.layers as Record<string, unknown>[])[0]
  it.each([
    ['not JSON', Buffer.from('{"schemaVersion": 2, '), 'MANIFEST_INVALID'],
    ['a JSON array', Buffer.from('[]'), 'MANIFEST_INVALID'],
    ['schemaVersion 1', Buffer.from(JSON.stringify({ schemaVersion: 1, name: 'x', tag: 'y', fsLayers: [] })), 'UNSUPPORTED'],
    ['schemaVersion 3', Buffer.from(JSON.stringify({ ...base, schemaVersion: 3 })), 'MANIFEST_INVALID'],
    ['a layer of size 1e300', Buffer.from(JSON.stringify({ ...base, layers: [{ ...layer0, size: 1e300 }] })), 'MANIFEST_INVALID'],
    ['a layer of size -1', Buffer.from(JSON.stringify({ ...base, layers: [{ ...layer0, size: -1 }] })), 'MANIFEST_INVALID'],
    ['a layer of size "12"', Buffer.from(JSON.stringify({ ...base, layers: [{ ...layer0, size: '12' }] })), 'MANIFEST_INVALID'],
    ['a config without a digest', Buffer.from(JSON.stringify({ ...base, config: { mediaType: OCI_CONFIG, size: 2 } })), 'MANIFEST_INVALID'],
    ['layers that are not an array', Buffer.from(JSON.stringify({ ...base, layers: {} })), 'MANIFEST_INVALID'],
  ])('%s fails %s', async (_, manifestBytes, code) => {
    const f = await fixture()
    await writeLayout(f.src, sampleImage(), { manifestBytes })
    await expect(copyNames(f, `oci:${f.src}:latest`, `oci:${f.dest}:latest`)).rejects.toMatchObject({ code })
    await expectClean(f)
  })
})

// ---- layouts naming what is not there ------------------------------------------------------------------

describe('index.json naming missing blobs', () => {
  it('a missing manifest fails MANIFEST_UNKNOWN or BLOB_UNKNOWN', async () => {
    const f = await fixture()
    const img = sampleImage()
    const manifest = digestOf(Buffer.from(JSON.stringify(img.manifest)))
    await writeLayout(f.src, img, { omit: [manifest] })
    await expect(copyNames(f, `oci:${f.src}:latest`, `oci:${f.dest}:latest`)).rejects.toMatchObject({
      code: expect.stringMatching(/^(MANIFEST_UNKNOWN|BLOB_UNKNOWN)$/),
    })
    await expectClean(f)
  })

  it.each(DESTS)('a missing layer fails BLOB_UNKNOWN (to %s)', async (_, dest) => {
    const f = await fixture()
    const img = sampleImage()
    const missing = digestOf(img.layers[0])
    await writeLayout(f.src, img, { omit: [missing] })
    await expect(copyNames(f, `oci:${f.src}:latest`, dest(f))).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    await expectClean(f, [missing])
  })

  it('an unknown tag fails MANIFEST_UNKNOWN', async () => {
    const f = await fixture()
    await writeLayout(f.src, sampleImage())
    await expect(copyNames(f, `oci:${f.src}:nosuchtag`, `oci:${f.dest}:latest`)).rejects.toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    await expectClean(f)
  })

  it('a blob symlinked out of the layout: nothing is written outside the destination', async () => {
    const f = await fixture()
    const img = sampleImage()
    const layer = digestOf(img.layers[0])
    await writeLayout(f.src, img, { omit: [layer] })
    await mkdir(join(f.root, 'outside'))
    await writeFile(join(f.root, 'outside', 'layer'), img.layers[0])
    await symlink(join(f.root, 'outside', 'layer'), join(f.src, 'blobs', 'sha256', digestHex(layer)))
    // Whether a symlinked blob is refused or read, the copy must not write outside the destination.
    await copyNames(f, `oci:${f.src}:latest`, `oci:${f.dest}:latest`).catch((err: unknown) => {
      expect(err).toMatchObject({ code: expect.any(String) })
    })
    await expectClean(f)
    expect((await stat(join(f.root, 'outside', 'layer'))).size).toBe(img.layers[0].length)
  })
})

// ---- archives ------------------------------------------------------------------------------------------

describe('archives that reach outside themselves', () => {
  const secretCases = (img: Image, outside: string): [string, RawEntry[]][] => {
    const entries = layoutEntries(img)
    const layerPath = `blobs/sha256/${digestHex(digestOf(img.layers[0]))}`
    const without = entries.filter((e) => e.path !== layerPath)
    return [
      ['an entry with ..', [...entries, { path: '../escaped', data: Buffer.from('x') }]],
      ['an entry with .. inside', [...entries, { path: 'blobs/../../escaped', data: Buffer.from('x') }]],
      ['an absolute entry', [...entries, { path: `${outside}/abs`, data: Buffer.from('x') }]],
      ['a layer symlinked to an absolute path', [...without, { path: layerPath, type: '2', linkname: `${outside}/layer` }]],
      ['a layer symlinked above the root', [...without, { path: layerPath, type: '2', linkname: '../../../outside/layer' }]],
      ['a layer hardlinked above the root', [...without, { path: layerPath, type: '1', linkname: '../outside/layer' }]],
      ['index.json symlinked out', [...entries.filter((e) => e.path !== 'index.json'), { path: 'index.json', type: '2', linkname: `${outside}/index.json` }]],
    ]
  }

  const names = secretCases(sampleImage(), '/x').map(([n]) => n)
  it.each(names)('oci-archive with %s fails ARCHIVE_INVALID', async (name) => {
    const f = await fixture()
    const img = sampleImage()
    const outside = join(f.root, 'outside')
    await mkdir(outside)
    // What an escaping link would find: the right bytes, so only the path check can stop it.
    await writeFile(join(outside, 'layer'), img.layers[0])
    await writeFile(join(outside, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: [] }))
    const entries = secretCases(img, outside).find(([n]) => n === name)![1]
    await writeFile(`${f.src}.tar`, rawTar(entries))
    await expect(copyNames(f, `oci-archive:${f.src}.tar:latest`, `oci:${f.dest}:latest`)).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    await expectClean(f)
    expect((await readdir(outside)).sort()).toEqual(['index.json', 'layer'])
  })

  const dockerCases = (config: Buffer, layer: Buffer, outside: string): [string, RawEntry[]][] => {
    const ok = (cfg: string, layers: string[]) => ({
      path: 'manifest.json',
      data: Buffer.from(JSON.stringify([{ Config: cfg, RepoTags: ['example.com/bad:latest'], Layers: layers }])),
    })
    const files = [
      { path: 'config.json', data: config },
      { path: 'layer.tar', data: layer },
    ]
    return [
      ['a Config path with ..', [ok('../config.json', ['layer.tar']), ...files]],
      ['a Layers path that is absolute', [ok('config.json', [`${outside}/layer.tar`]), ...files]],
      ['an entry with ..', [ok('config.json', ['layer.tar']), ...files, { path: '../escaped', data: Buffer.from('x') }]],
      ['an absolute entry', [ok('config.json', ['layer.tar']), ...files, { path: `${outside}/abs`, data: Buffer.from('x') }]],
      ['a layer symlinked to an absolute path', [ok('config.json', ['layer.tar']), files[0], { path: 'layer.tar', type: '2', linkname: `${outside}/layer.tar` }]],
      ['a layer symlinked above the root', [ok('config.json', ['layer.tar']), files[0], { path: 'layer.tar', type: '2', linkname: '../outside/layer.tar' }]],
      ['a layer hardlinked above the root', [ok('config.json', ['layer.tar']), files[0], { path: 'layer.tar', type: '1', linkname: '../outside/layer.tar' }]],
    ]
  }

  const dockerNames = dockerCases(Buffer.alloc(0), Buffer.alloc(0), '/x').map(([n]) => n)
  it.each(dockerNames)('docker-archive with %s fails ARCHIVE_INVALID', async (name) => {
    const f = await fixture()
    const layer = rawTar([{ path: 'hello.txt', data: Buffer.from('hello\n') }])
    const config = Buffer.from(
      JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [digestOf(layer)] } }),
    )
    const outside = join(f.root, 'outside')
    await mkdir(outside)
    await writeFile(join(outside, 'layer.tar'), layer)
    const entries = dockerCases(config, layer, outside).find(([n]) => n === name)![1]
    await writeFile(`${f.src}.tar`, rawTar(entries))
    await expect(copyNames(f, `docker-archive:${f.src}.tar`, `oci:${f.dest}:latest`)).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    await expectClean(f)
    expect(await readdir(outside)).toEqual(['layer.tar'])
  })

  it('a truncated archive fails ARCHIVE_INVALID', async () => {
    const f = await fixture()
    const whole = rawTar(layoutEntries(sampleImage()))
    await writeFile(`${f.src}.tar`, whole.subarray(0, whole.length - 4096 - 300))
    await expect(copyNames(f, `oci-archive:${f.src}.tar:latest`, `dir:${f.dest}`)).rejects.toMatchObject({
      code: expect.stringMatching(/^(ARCHIVE_INVALID|SIZE_INVALID|DIGEST_INVALID)$/),
    })
    await expectClean(f)
  })
})
