// The transport registry: an explicit list, so every scheme blobcache understands is visible in
// one line, and the functions that turn `transport:reference` strings into references and back.
import { ImageError, isImageError } from '../errors.js'
import type { ImageReference, ImageTransport } from '../types.js'
import { dir } from './dir.js'
import { docker } from './docker.js'
import { dockerArchive } from './docker-archive.js'
import { ociArchive } from './oci-archive.js'
import { ociLayout } from './oci-layout.js'

/** Every transport, by scheme. */
export const transports: readonly ImageTransport[] = [dir, ociLayout, ociArchive, dockerArchive, docker]

/** The transport called `name`, or undefined. */
export function transportByName(name: string): ImageTransport | undefined {
  return transports.find((t) => t.name === name)
}

/**
 * Parses an image name such as `oci:/srv/layout:latest` or `dir:./img`: the scheme before the
 * first colon picks the transport, which parses the rest. Throws `TRANSPORT_UNKNOWN` for an
 * unknown scheme and `REFERENCE_INVALID` for a malformed name.
 */
export function parseImageName(s: string): ImageReference {
  const at = s.indexOf(':')
  if (at <= 0) {
    throw new ImageError('REFERENCE_INVALID', `invalid image name ${JSON.stringify(s)}: expected transport:reference (e.g. oci:/path:tag)`)
  }
  const name = s.slice(0, at)
  const transport = transportByName(name)
  if (!transport) {
    const known = transports.map((t) => t.name).join(', ')
    throw new ImageError('TRANSPORT_UNKNOWN', `unknown transport ${JSON.stringify(name)} in ${JSON.stringify(s)} (known: ${known})`)
  }
  try {
    return transport.parseReference(s.slice(at + 1))
  } catch (err) {
    if (isImageError(err)) throw err
    throw new ImageError('REFERENCE_INVALID', `invalid image name ${JSON.stringify(s)}: ${(err as Error).message}`, { cause: err })
  }
}

/** The full name of a reference, `transport:within`, which {@link parseImageName} parses back. */
export function imageName(ref: ImageReference): string {
  return `${ref.transport.name}:${ref.stringWithinTransport()}`
}
