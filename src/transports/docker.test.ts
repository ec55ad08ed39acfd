import { describe, expect, it } from 'vitest'
import { digestOf } from '../digest.js'
import { registryHost } from '../registry/client.js'
import { DockerReference, docker, listTags, parseDockerReference } from './docker.js'

describe('docker: references', () => {
  it.each([
    ['//alpine', 'docker.io', 'library/alpine', '//docker.io/library/alpine:latest'],
    ['//alpine:3.19', 'docker.io', 'library/alpine', '//docker.io/library/alpine:3.19'],
    ['//user/app', 'docker.io', 'user/app', '//docker.io/user/app:latest'],
    ['//index.docker.io/library/busybox:1', 'docker.io', 'library/busybox', '//docker.io/library/busybox:1'],
    ['//127.0.0.1:5000/team/app:v1', '127.0.0.1:5000', 'team/app', '//127.0.0.1:5000/team/app:v1'],
    ['//localhost/app', 'localhost', 'app', '//localhost/app:latest'],
    ['//quay.io/a/b/c', 'quay.io', 'a/b/c', '//quay.io/a/b/c:latest'],
  ])('parses %s', (input, registry, repository, within) => {
    const ref = docker.parseReference(input) as DockerReference
    expect(ref.registry).toBe(registry)
    expect(ref.repository).toBe(repository)
    expect(ref.stringWithinTransport()).toBe(within)
    expect((docker.parseReference(within) as DockerReference).stringWithinTransport()).toBe(within)
    expect(ref.dockerReference().toString()).toBe(within.slice(2))
  })

  it('keeps a digest and fetches by it', () => {
    const d = digestOf('m')
    const ref = parseDockerReference(`//reg.example/app@${d}`)
    expect(ref.manifestReference).toBe(d)
    expect(ref.stringWithinTransport()).toBe(`//reg.example/app@${d}`)
    expect(parseDockerReference('//reg.example/app:v2').manifestReference).toBe('v2')
  })

  it.each([
    ['alpine', 'must start with //'],
    ['/alpine', 'must start with //'],
    ['//', ''],
    ['//Alpine', ''],
    ['//reg.example/app:v1@' + digestOf('x'), 'both a tag and a digest'],
    ['//reg.example/app@sha256:abc', ''],
    ['//reg.example/app:bad tag', ''],
  ])('refuses %s with REFERENCE_INVALID', (input, why) => {
    expect(() => docker.parseReference(input)).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID', message: expect.stringContaining(why) }))
  })

  it('talks to registry-1.docker.io for docker.io', () => {
    expect(registryHost('docker.io')).toBe('registry-1.docker.io')
    expect(registryHost('127.0.0.1:5000')).toBe('127.0.0.1:5000')
  })

  it('refuses to list tags of a non-docker reference', async () => {
    const fake = { transport: { name: 'oci', parseReference: () => fake }, dockerReference: () => undefined } as never
    await expect(listTags(fake)).rejects.toMatchObject({ code: 'UNSUPPORTED' })
  })

  it('opens destinations that want compressed layers and accept lists', async () => {
    const dest = await parseDockerReference('//127.0.0.1:1/x:y').newImageDestination()
    expect(dest.desiredLayerCompression()).toBe('compress')
    expect(dest.acceptsImageLists()).toBe(true)
    expect(dest.supportedManifestMIMETypes()).toEqual([
      'application/vnd.oci.image.manifest.v1+json',
      'application/vnd.docker.distribution.manifest.v2+json',
      'application/vnd.oci.image.index.v1+json',
      'application/vnd.docker.distribution.manifest.list.v2+json',
    ])
    await expect(dest.putManifest(Buffer.from('{}'), undefined)).resolves.toBeUndefined()
    const pinned = await parseDockerReference(`//127.0.0.1:1/x@${digestOf('a')}`).newImageDestination()
    await expect(pinned.putManifest(Buffer.from('b'))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await dest.close()
  })
})
