// registries.conf against real registries: the origin is down and a mirror holds the image
// under another path; a copy of the origin's name reads it from the mirror (by tag, and by
// digest from a digest-only mirror), a remapped location is read without a mirror, a blocked
// namespace is refused, and skopeo with the same file (--registries-conf) reads the same
// manifest. Mirrors apply to reading only: a push goes to the name as given.
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { copyImage } from '../../src/copy.js'
import { ImageCache } from '../../src/image-cache/index.js'
import { parseImageName } from '../../src/transports/index.js'
import { cliBuilt, cliCommand, runCommand } from '../helpers/built-cli.js'
import { peer } from '../helpers/peers.js'
import { type RandomImage, writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'

describe.skipIf(!peer('docker-registry'))('docker:// with registries.conf', () => {
  let origin: TestRegistry
  let mirror: TestRegistry
  let image: RandomImage
  let conf: string
  let root: string

  beforeAll(async () => {
    ;[origin, mirror] = await Promise.all([startRegistry(), startRegistry()])
    root = await mkdtemp(join(tmpdir(), 'blobcache-mirrors-'))
    // the image lives on the mirror only, under mirror/team/app; the origin is down
    image = await writeRandomImage(registryRef(mirror.host, 'mirror/team/app:v1'), { layers: 2, seed: 51 })
    await origin.halt()
    conf = join(root, 'registries.conf')
    await writeFile(
      conf,
      [
        '# test configuration',
        '[[registry]]',
        `prefix = "${origin.host}/team"`,
        `location = "${origin.host}/team"`,
        'insecure = true',
        '[[registry.mirror]]',
        `location = "${mirror.host}/mirror/team"`,
        'insecure = true',
        '',
        '[[registry]]',
        `prefix = "remapped.test/team"`,
        `location = "${mirror.host}/mirror/team"`,
        'insecure = true',
        '',
        '[[registry]]',
        `prefix = "${origin.host}/secret"`,
        `location = "${origin.host}/secret"`,
        'blocked = true',
        '',
      ].join('\n'),
    )
  })
  afterAll(async () => {
    await Promise.all([origin?.stop(), mirror?.stop(), root && rm(root, { recursive: true, force: true })])
  })

  it('reads from the mirror while the origin is down, by tag and by digest; a remapped name; a blocked one is refused', async () => {
    const ctx = { registry: { registriesConf: conf } }
    for (const name of [`docker://${origin.host}/team/app:v1`, `docker://${origin.host}/team/app@${image.manifestDigest}`, 'docker://remapped.test/team/app:v1']) {
      const out = join(root, `out-${Math.random().toString(36).slice(2)}`)
      const result = await copyImage(parseImageName(name), parseImageName(`oci:${out}:v1`), { sourceCtx: ctx })
      expect(result.digest, name).toBe(image.manifestDigest)
      const index = JSON.parse(await readFile(join(out, 'index.json'), 'utf8'))
      expect(index.manifests[0].digest).toBe(image.manifestDigest)
    }
    // without the file the origin is tried, and it is down
    await expect(copyImage(parseImageName(`docker://${origin.host}/team/app:v1`), parseImageName(`oci:${root}/none:v1`), { sourceCtx: { registry: { tlsVerify: false } } })).rejects.toMatchObject({
      code: 'REGISTRY_ERROR',
    })
    await expect(parseImageName(`docker://${origin.host}/secret/app:v1`).newImageSource(ctx)).rejects.toMatchObject({ code: 'REGISTRY_BLOCKED' })
  })

  it('ImageCache pulls read from the mirror too, and name the image by its own name', async () => {
    const cache = await ImageCache.open(join(root, 'images'))
    const ref = `${origin.host}/team/app:v1`
    const d = await cache.imagePull(ref, { registry: { registriesConf: conf } })
    expect(d.digest).toBe(image.manifestDigest)
    expect(d.annotations?.['org.opencontainers.image.ref.name']).toBe(ref)
    expect(await cache.imageInCache(ref)).toBe(true)
    await expect(cache.imagePull(`${origin.host}/secret/app:v1`, { registry: { registriesConf: conf } })).rejects.toMatchObject({ code: 'REGISTRY_BLOCKED' })
    if (cliBuilt()) {
      const [cmd, args] = cliCommand(['image-cache', '--cache', join(root, 'images-cli'), 'pull', '--registries-conf', conf, ref])
      const pulled = await runCommand(cmd, args)
      expect(pulled.code, pulled.stderr).toBe(0)
      expect(pulled.stdout).toContain(image.manifestDigest)
    }
  })

  it.skipIf(!cliBuilt())('the CLI takes --registries-conf and CONTAINERS_REGISTRIES_CONF, and skopeo reads the same file the same way', async () => {
    const remote = `docker://${origin.host}/team/app:v1`
    const [cmd, args] = cliCommand(['inspect', '--registries-conf', conf, remote])
    const ours = await runCommand(cmd, args)
    expect(ours.code, ours.stderr).toBe(0)
    expect(JSON.parse(ours.stdout).Digest).toBe(image.manifestDigest)
    const [, copyArgs] = cliCommand(['copy', '-q', remote, `oci:${root}/cli:v1`])
    const copied = await runCommand(cmd, copyArgs, { ...process.env, CONTAINERS_REGISTRIES_CONF: conf })
    expect(copied.code, copied.stderr).toBe(0)
    const blocked = await runCommand(cmd, ['inspect', '--registries-conf', conf, `docker://${origin.host}/secret/app:v1`])
    expect(blocked.code).toBe(1)
    expect(blocked.stderr).toMatch(/blocked by registries\.conf/)
    if (peer('skopeo')) {
      const theirs = await runCommand('skopeo', ['--registries-conf', conf, 'inspect', '--no-tags', remote])
      expect(theirs.code, theirs.stderr).toBe(0)
      expect(JSON.parse(theirs.stdout).Digest).toBe(image.manifestDigest)
      const theirsBlocked = await runCommand('skopeo', ['--registries-conf', conf, 'inspect', `docker://${origin.host}/secret/app:v1`])
      expect(theirsBlocked.code).not.toBe(0)
    }
  })
})
