variable "name" {
  type        = string
  description = "Repository name: the cluster's name, as the seed sets it up."

  validation {
    condition     = can(regex("^karrots-[a-z0-9-]{1,32}$", var.name))
    error_message = "name must be karrots- followed by lowercase letters, digits and '-'."
  }
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}

variable "image_tag_mutability" {
  type        = string
  description = "IMMUTABLE (default): a tag, once pushed, always names the same image, so a deployment cannot change under a tag. MUTABLE for teams that move tags such as latest."
  default     = "IMMUTABLE"

  validation {
    condition     = contains(["IMMUTABLE", "MUTABLE"], var.image_tag_mutability)
    error_message = "image_tag_mutability must be IMMUTABLE or MUTABLE."
  }
}
