// Names, platforms and index merging: the pure parts of the image cache.
import { describe, expect, it } from 'vitest'
import { digestOf } from '../digest.js'
import type { Descriptor } from '../manifest.js'
import { MediaType } from '../media-types.js'
import { appendRemote, cleanEntries, mergeEntries } from './merge.js'
import { cacheKey, cacheName, storedKey } from './names.js'
import { chooseInstance, platformKey, platformSatisfies, toPlatform } from './platforms.js'
import { archTagsOf } from './push.js'

const d = (seed: string, platform?: string, annotations?: Record<string, string>): Descriptor => ({
  mediaType: MediaType.ociManifest,
  digest: digestOf(seed),
  size: 1,
  ...(platform ? { platform: toPlatform(platform) } : {}),
  ...(annotations ? { annotations } : {}),
})
const att = (seed: string, of: Descriptor) => d(seed, 'unknown/unknown', { 'vnd.docker.reference.digest': of.digest, 'vnd.docker.reference.type': 'attestation-manifest' })

describe('cache names (scenario 3)', () => {
  it.each([
    ['alpine', 'docker.io/library/alpine:latest'],
    ['alpine:3.19', 'docker.io/library/alpine:3.19'],
    ['docker.io/alpine:1', 'docker.io/library/alpine:1'],
    ['index.docker.io/library/alpine:1', 'docker.io/library/alpine:1'],
    ['foo/bar', 'docker.io/foo/bar:latest'],
    ['localhost/x', 'localhost/x:latest'],
    ['reg.io/x', 'reg.io/x:latest'],
    ['a/b/c', 'docker.io/a/b/c:latest'],
    ['localhost:5000/x', 'localhost:5000/x:latest'],
  ])('%s -> %s', (given, key) => {
    expect(cacheKey(given)).toBe(key)
  })

  it('keeps digests, refuses malformed ones and empty names', () => {
    const digest = digestOf('x')
    expect(cacheName(`alpine@${digest}`)).toMatchObject({ key: `docker.io/library/alpine@${digest}`, digest })
    expect(cacheName(`alpine:1@${digest}`).key).toBe(`docker.io/library/alpine:1@${digest}`)
    expect(() => cacheName('x@sha256:abc')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => cacheName('')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(storedKey('Not A Name')).toBeUndefined()
  })
})

describe('platforms', () => {
  it('arm64 and arm64/v8 are one platform; arm/v6 and arm/v7 are not (scenario 9)', () => {
    expect(platformKey(toPlatform('linux/arm64/v8'))).toBe(platformKey(toPlatform('linux/arm64')))
    expect(platformKey(toPlatform('linux/arm/v6'))).not.toBe(platformKey(toPlatform('linux/arm/v7')))
    const index = { schemaVersion: 2 as const, manifests: [d('arm64', 'linux/arm64'), d('v6', 'linux/arm/v6')] }
    expect(chooseInstance(index, toPlatform('linux/arm64/v8'))?.digest).toBe(digestOf('arm64'))
    expect(chooseInstance(index, toPlatform('linux/arm/v7'))?.digest).toBe(digestOf('v6'))
    expect(chooseInstance(index, toPlatform('linux/amd64'))).toBeUndefined()
  })

  it('judges a config platform against a request', () => {
    expect(platformSatisfies({ os: 'linux', architecture: 'arm64', variant: 'v8' }, toPlatform('linux/arm64'))).toBe(true)
    expect(platformSatisfies({ os: 'linux', architecture: 'amd64' }, toPlatform('linux/arm64'))).toBe(false)
    expect(platformSatisfies({ os: 'linux', architecture: 'arm', variant: 'v6' }, toPlatform('linux/arm/v7'))).toBe(true)
    expect(platformSatisfies({ os: 'linux', architecture: 'arm', variant: 'v7' }, toPlatform('linux/arm/v6'))).toBe(false)
  })
})

describe('merging index entries', () => {
  const amd = d('amd', 'linux/amd64')
  const arm = d('arm', 'linux/arm64')
  const amd2 = d('amd2', 'linux/amd64')

  it('replaces by platform in place, appends in order, drops stale attestations and repeats', () => {
    const base = [amd, arm, att('att-amd', amd), att('att-arm', arm)]
    const s390 = d('s390', 'linux/s390x')
    const merged = mergeEntries(base, [amd2, s390, arm])
    expect(merged.map((e) => e.digest)).toEqual([amd2, arm, att('att-arm', arm), s390].map((e) => e.digest))
    expect(mergeEntries([], [amd, amd]).map((e) => e.digest)).toEqual([amd.digest])
  })

  it('appendRemote keeps local platforms, adds remote-only ones and valid remote attestations', () => {
    const s390 = d('s390', 'linux/s390x')
    const remote = [d('remote-amd', 'linux/amd64'), s390, att('r-s390', s390), att('r-amd', d('remote-amd', 'linux/amd64'))]
    expect(appendRemote([amd2, arm], remote).map((e) => e.digest)).toEqual([amd2, arm, s390, att('r-s390', s390)].map((e) => e.digest))
    expect(cleanEntries([att('lonely', amd)])).toEqual([])
  })

  it('arch tags skip attestations and unknown, and name arm variants when there are several', () => {
    const tags = archTagsOf([amd, arm, att('a', amd), d('v6', 'linux/arm/v6'), d('v7', 'linux/arm/v7')])
    expect(tags.map(([t]) => t)).toEqual(['amd64', 'arm64', 'arm-v6', 'arm-v7'])
  })
})
