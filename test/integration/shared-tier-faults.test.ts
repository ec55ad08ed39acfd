// The shared cache tier is best effort (issue 7, items 5 and 6): a tier registry that is down
// before the copy, stopped (by its pid) while a blob streams from it, refusing the credentials,
// or refusing auth in the middle of a copy never fails the copy (exit 0, the right image, one
// warning line, counted in the stats); a corrupt blob in the tier is a miss, fetched from the
// origin instead, and never served. Every "machine" is a separate CLI process (dist/cli.js).
import { randomBytes } from 'node:crypto'
import { readFile, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { digestOf } from '../../src/digest.js'
import { testDir } from '../helpers/conformance.js'
import { startDripProxy } from '../helpers/drip-proxy.js'
import { type FaultProxy, startFaultProxy } from '../helpers/fault-proxy.js'
import { peer } from '../helpers/peers.js'
import { type RandomImage, writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'
import {
  type MachineExit,
  blobDataPath,
  blobRequests,
  cliBuilt,
  expectSuccess,
  readLayout,
  runMachine,
  sharedStatsOf,
  startMachine,
  waitUntil,
  warningLines,
} from '../helpers/shared-tier.js'

const UNAUTHORIZED = {
  kind: 'status' as const,
  status: 401,
  headers: { 'www-authenticate': 'Basic realm="test-registry"' },
  body: JSON.stringify({ errors: [{ code: 'UNAUTHORIZED', message: 'authentication required' }] }),
}

describe.skipIf(!peer('docker-registry') || !peer('htpasswd') || !cliBuilt())('shared cache tier: failures', () => {
  let origin: TestRegistry
  let proxy: FaultProxy

  beforeAll(async () => {
    origin = await startRegistry()
    proxy = await startFaultProxy(origin.host)
  })
  afterAll(async () => {
    await proxy?.close()
    await origin?.stop()
  })

  /** The copy arguments of one machine: origin (through the recording proxy) -> an OCI layout. */
  function copyArgs(cache: string, tierName: string, image: string, out: string, extra: string[] = []): string[] {
    return [
      'copy', '--json', '--src-tls-verify=false', '--blob-cache', cache, '--shared-cache', tierName, '--shared-tls-verify=false',
      ...extra, `docker://${proxy.host}/${image}`, `oci:${out}:v1`,
    ]
  }

  /** The copy succeeded with the right image, and said exactly one line about the shared cache. */
  async function expectWarnedOnce(exit: MachineExit, image: RandomImage, out: string): Promise<void> {
    expectSuccess(exit)
    expect(exit.json?.manifestDigest).toBe(image.manifestDigest)
    const got = await readLayout(out)
    expect(got.manifestDigest).toBe(image.manifestDigest)
    for (const [d, bytes] of image.blobs) expect(got.blobs.get(d)?.equals(bytes)).toBe(true)
    const warnings = warningLines(exit.stderr)
    expect(warnings, exit.stderr).toHaveLength(1)
    expect(warnings[0]).toMatch(/shared/i)
    const stats = sharedStatsOf(exit)
    expect(stats.warnings).toBe(1)
    expect(stats.errors + stats.failed).toBeGreaterThanOrEqual(1)
  }

  it('a tier registry stopped before the copy: exit 0, one warning line, counted', async () => {
    const root = await testDir()
    const image = await writeRandomImage(registryRef(origin.host, 'down/before:v1'), { layers: 3, layerSize: 64 << 10, seed: 301 })
    const tier = await startRegistry()
    try {
      await tier.halt() // stopped by its pid; nothing listens on its port now
      const t0 = Date.now()
      const exit = await runMachine(copyArgs(join(root, 'A'), `docker://${tier.host}/cache/down`, 'down/before:v1', join(root, 'out')))
      await expectWarnedOnce(exit, image, join(root, 'out'))
      expect(Date.now() - t0).toBeLessThan(20_000) // a down tier does not stall the copy
    } finally {
      await tier.stop()
    }
  })

  it('a tier registry stopped by its pid while a blob streams from it: the copy falls back to the origin', async () => {
    const root = await testDir()
    const image = await writeRandomImage(registryRef(origin.host, 'down/mid:v1'), { layers: 3, layerSize: 512 << 10, seed: 302 })
    const tier = await startRegistry()
    // the second machine reaches the tier through a proxy that drips blob downloads slowly
    const drip = await startDripProxy(tier.host)
    try {
      const first = await runMachine(copyArgs(join(root, 'A'), `docker://${tier.host}/cache/mid`, 'down/mid:v1', join(root, 'out1')))
      expectSuccess(first)
      drip.setRules([{ method: 'GET', path: /\/blobs\/sha256:/, bytes: 16 << 10, everyMs: 20 }])
      proxy.clear()
      const second = startMachine(copyArgs(join(root, 'B'), `docker://${drip.host}/cache/mid`, 'down/mid:v1', join(root, 'out2')))
      const timer = setTimeout(() => void second.kill(), 60_000)
      let exit: MachineExit
      try {
        await waitUntil(() => drip.dripped > 0, 'a blob download from the tier')
        await tier.halt()
        exit = await second.done
      } finally {
        clearTimeout(timer)
        await second.kill()
      }
      await expectWarnedOnce(exit, image, join(root, 'out2'))
      // what the tier could not deliver came from the origin
      expect(blobRequests(proxy).length).toBeGreaterThanOrEqual(1)
    } finally {
      await drip.close()
      await tier.stop()
    }
  })

  describe('a tier behind htpasswd auth', () => {
    let tier: TestRegistry
    let authProxy: FaultProxy
    beforeAll(async () => {
      tier = await startRegistry({ auth: 'htpasswd', users: { alice: 'wonderland' } })
      authProxy = await startFaultProxy(tier.host)
    })
    afterAll(async () => {
      await authProxy?.close()
      await tier?.stop()
    })

    it('wrong --shared-creds: exit 0, one warning line, counted', async () => {
      const root = await testDir()
      const image = await writeRandomImage(registryRef(origin.host, 'auth/wrong:v1'), { layers: 2, layerSize: 64 << 10, seed: 303 })
      const exit = await runMachine(
        copyArgs(join(root, 'A'), `docker://${tier.host}/cache/auth`, 'auth/wrong:v1', join(root, 'out'), ['--shared-creds', 'alice:nope']),
      )
      await expectWarnedOnce(exit, image, join(root, 'out'))
    })

    it('auth refused in the middle of a copy (every request after the first few answered 401): exit 0, one warning line', async () => {
      const root = await testDir()
      const image = await writeRandomImage(registryRef(origin.host, 'auth/mid:v1'), { layers: 6, layerSize: 64 << 10, seed: 304 })
      const creds = ['--shared-creds', 'alice:wonderland']
      const first = await runMachine(copyArgs(join(root, 'A'), `docker://${tier.host}/cache/auth`, 'auth/mid:v1', join(root, 'out1'), creds))
      expectSuccess(first)
      expect(warningLines(first.stderr)).toEqual([])
      // the first few requests pass (ping, authentication, some lookups), then the tier refuses
      authProxy.setRules([
        { path: /./, count: 6, fault: { kind: 'delay', ms: 0 } },
        { path: /./, fault: UNAUTHORIZED },
      ])
      authProxy.clear()
      const exit = await runMachine(copyArgs(join(root, 'B'), `docker://${authProxy.host}/cache/auth`, 'auth/mid:v1', join(root, 'out2'), creds))
      await expectWarnedOnce(exit, image, join(root, 'out2'))
      expect(authProxy.requests.filter((r) => r.status >= 200 && r.status < 300).length).toBeGreaterThanOrEqual(1)
      expect(authProxy.requests.filter((r) => r.status === 401 && r.fault === 'status').length).toBeGreaterThanOrEqual(1)
    })
  })

  it.each([
    ['small: its whole body arrives at once', 128 << 10, 305],
    ['large: its body streams', 4 << 20, 306],
  ])('a corrupt blob in the tier (same size, other bytes) is a miss: fetched from the origin, never served (%s)', async (_what, layerSize, seed) => {
    const root = await testDir()
    const image = await writeRandomImage(registryRef(origin.host, `corrupt/app${seed}:v1`), { layers: 3, layerSize, seed })
    const tier = await startRegistry()
    try {
      const tierName = `docker://${tier.host}/cache/corrupt`
      const first = await runMachine(copyArgs(join(root, 'A'), tierName, `corrupt/app${seed}:v1`, join(root, 'out1')))
      expectSuccess(first)
      const victim = image.layers[1]
      const data = blobDataPath(tier.dir, victim.digest)
      const size = (await stat(data)).size
      expect(size).toBe(victim.size)
      await writeFile(data, randomBytes(size))

      proxy.clear()
      const exit = await runMachine(copyArgs(join(root, 'B'), tierName, `corrupt/app${seed}:v1`, join(root, 'out2')))
      await expectWarnedOnce(exit, image, join(root, 'out2'))
      // only the corrupt layer came from the origin; the rest from the tier
      expect(blobRequests(proxy).map((r) => r.path.split('/').pop())).toEqual([victim.digest])
      const stats = sharedStatsOf(exit)
      expect(stats.hits).toBeGreaterThanOrEqual(image.layers.length) // the other layers and the config
      expect(stats.errors).toBeGreaterThanOrEqual(1)
      // the second machine's cache holds the right bytes, not the tier's
      expect(digestOf(await readFile(join(root, 'B', victim.digest)))).toBe(victim.digest)
    } finally {
      await tier.stop()
    }
  })
})
